#!/usr/bin/env bash
# The full 1M-token step of issue 9 on 2x H200, first and alone (prepared in session 5, run in session 6: 1422 s
# step, 80.7 GiB allocated; RESULTS.md). Start it in the background with
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu6_memory_1m.sh 560      (carry .whl)
# and follow it with `bash benchmarks/sessions/gpu4_run.sh - 560` calls, each issued at once (the machine goes
# back after 30 s without a call).
# Placement (RESULTS.md, session 5): model states about 48 GiB and a working set of about 39 GiB per GPU
# allocated at 512K local tokens. Session 6 ran it with 4 layer inputs (4 GiB each) on the GPU and 28 in pinned
# host memory (112 GiB per rank, 229 of 251 GiB for both), for margin against a 30 GiB reserved gap.
# Beside its start-up, small and on the same GPUs: the GPU tests and the HF check, which re-test session 5's
# send-buffer fix under load (the condition in which dist_flash's gradients went wrong in session 5).
PART=memory_1m; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
( torchrun --nproc_per_node=2 --master_port 29611 benchmarks/check_hf_gpu.py --seq 8192 > "$R/check_hf_gpu.log" 2>&1
  mark "check_hf_gpu: exit $?"; grep -E "grad rel err" "$R/check_hf_gpu.log" | cut -c1-120 >> "$R/timings.txt"
  python -m pytest -q -m gpu tests/ > "$R/gpu_tests.log" 2>&1; mark "gpu tests: exit $?: $(tail -n 1 "$R/gpu_tests.log")" ) &
python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --config zero3 --lengths "${LENGTHS:-1048576}" \
  --options "${OPTIONS:-tiled+offload28+fused=--tiled-mlp 4096 --fuse-pointwise --offload-activations 28}" \
  --timeout 1750 --json "$R/memory_1m.json" --plot "$R/memory_1m.png" > "$R/memory_1m.log" 2>&1
mark "full 1M step: exit $?"; grep -E "^\{|^\| tiled" "$R/memory_1m.log" | cut -c1-600
wait
