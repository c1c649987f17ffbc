#!/usr/bin/env bash
# Prepared in session 6 for the next 2x H200 session (not yet run; parts 1b, 1c added in session 7). About 23
# minutes of device time:
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu7_profile_and_curve.sh 560     (carry .whl)
# then `bash benchmarks/sessions/gpu4_run.sh - 560` calls, each issued at once.
# 1. Issue 8: the 128K Llama-2-7B step with the default settings (keep + fuse, 5e8 buckets), profiled on its
#    last step, now with the top kernels and aten ops (with shapes) behind the "other" time. Alone: it is timed.
# 2. Session 6's cuDNN fix on GPU: the GPU tests (the new cache test among them) and the HF check in its
#    default order (dist_flash after zigzag: 0.47 before the fix, about 1.3e-2 expected), beside part 3.
# 3. Issue 9's curve at full depth: one 256K step of the Llama-3-8B shape with each memory option on and off
#    (`--fuse-pointwise` off in all four: it does not change memory and its compile would lengthen each run).
#    Each row now also logs the allocator's cached memory in the compute stream's pool vs other streams': where
#    the 2-GPU reserved-vs-allocated gap (32 GiB at 1M) sits.
PART=profile_and_curve; source benchmarks/sessions/gpu4_env.sh
python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 4 --warmup 1 --profile-step 4 \
  --timeout 400 --json "$R/bench_train_profile.json" > "$R/bench_train_profile.log" 2>&1
mark "128K profile: exit $?"; grep -E "^\| zero3|ceiling|no compute" "$R/bench_train_profile.log" | cut -c1-200
# 1b (session 7). The same step as rank 0 of 2 emulated on GPU 0 alone (benchmarks/emulate_rank.py: no
#    communication, receives looped back so the data stay finite), profiled the same way: the compute-only
#    time per kind. Real minus emulated = what communication costs the step (session 7 saw 17.4 vs 21.43 s).
python benchmarks/bench_train.py --emulate --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 4 --warmup 1 --profile-step 4 \
  --timeout 400 --json "$R/bench_train_profile_emulated.json" > "$R/bench_train_profile_emulated.log" 2>&1
mark "128K emulated profile: exit $?"; grep -E "^\| zero3|no compute" "$R/bench_train_profile_emulated.log" | cut -c1-200
# 1c (session 7). If communication costs the step through NCCL kernels taking SMs from overlapped compute,
#    capping NCCL's CTAs (NCCL_MAX_CTAS, since NCCL 2.17) makes the step faster; if it waits on transfers, slower.
NCCL_MAX_CTAS=4 python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 \
  --backends zigzag_ring --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 3 --warmup 1 \
  --timeout 400 --json "$R/bench_train_max_ctas4.json" > "$R/bench_train_max_ctas4.log" 2>&1
mark "128K with NCCL_MAX_CTAS=4: exit $?"; grep -E "^\| zero3" "$R/bench_train_max_ctas4.log" | cut -c1-200

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
( python -m pytest -q -m gpu tests/ > "$R/gpu_tests.log" 2>&1; mark "gpu tests: exit $?: $(tail -n 1 "$R/gpu_tests.log")"
  torchrun --nproc_per_node=2 --master_port 29615 benchmarks/check_hf_gpu.py --seq 8192 > "$R/check_hf_gpu.log" 2>&1
  mark "check_hf_gpu: exit $?"; grep -E "grad rel err" "$R/check_hf_gpu.log" | cut -c1-120 >> "$R/timings.txt" ) &
python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --config zero3 --lengths 262144 --timeout 420 \
  --options "checkpointing=;tiled=--tiled-mlp 4096;offload=--offload-activations;tiled+offload=--tiled-mlp 4096 --offload-activations" \
  --json "$R/memory_256k_options.json" --plot "$R/memory_256k_options.png" > "$R/memory_256k_options.log" 2>&1
mark "256K with each option: exit $?"; grep -E "^\| " "$R/memory_256k_options.log" | cut -c1-200
wait
