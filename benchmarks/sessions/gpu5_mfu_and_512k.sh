#!/usr/bin/env bash
# Session 5 (2x H200), the second background part, after gpu5_memory_1m_probe.sh showed that a full 1M step
# (about 25 minutes by the 2-layer step) does not fit this session's remaining device time. Started by
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu5_mfu_and_512k.sh 560      (carry .whl)
# 1. Issue 8, 128K Llama-2-7B, keep + fuse: accelerate's "auto" ZeRO-3 buckets vs 5e8-parameter buckets (one run),
#    then the larger buckets with the last 3 layers not checkpointed.
# 2. Issue 9: the 2-layer 1M step again with one ring per head group and the offload fetch allocated on the
#    compute stream (both new since the first probe), beside the GPU tests of that code.
# 3. Issue 9: one full 32-layer Llama-3-8B step at 512K with every layer input offloaded.
PART=mfu_and_512k; source benchmarks/sessions/gpu4_env.sh
FAST="--keep-attention --fuse-pointwise"
python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3,benchmarks/configs/zero3_big_buckets.yaml --variants="$FAST" --steps 3 --warmup 1 --timeout 300 \
  --json "$R/bench_train_buckets.json" > "$R/bench_train_buckets.log" 2>&1
mark "128K auto vs big buckets: exit $?"; grep -E "^\| zero3|^\| bench|ceiling" "$R/bench_train_buckets.log"
python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs benchmarks/configs/zero3_big_buckets.yaml --variants="$FAST --no-gradient-checkpointing 3" \
  --steps 3 --warmup 1 --timeout 300 --json "$R/bench_train_skip3.json" > "$R/bench_train_skip3.log" 2>&1
mark "128K big buckets + last 3 layers uncheckpointed: exit $?"; grep -E "^\| bench|ceiling" "$R/bench_train_skip3.log"

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
( python -m pytest -q -m gpu tests/ > "$R/gpu_tests2.log" 2>&1; mark "gpu tests: exit $?: $(tail -n 1 "$R/gpu_tests2.log")" ) &
FLAGS="--tiled-mlp 4096 --fuse-pointwise --offload-activations"
python benchmarks/bench_memory.py --gpus 2 --model "shape:llama3-8b,num_hidden_layers=2" --config zero3 \
  --lengths 1048576 --options "2 layers, all offloaded, ring per head group=$FLAGS" --timeout 420 \
  --json "$R/memory_1m_2layers_v2.json" > "$R/memory_1m_2layers_v2.log" 2>&1
mark "2-layer 1M step v2: exit $?"; grep -E "^\| 2 layers" "$R/memory_1m_2layers_v2.log"
wait
python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --config zero3 --lengths 524288 \
  --options "tiled+offload all+fused=$FLAGS" --timeout 720 \
  --json "$R/memory_512k.json" > "$R/memory_512k.log" 2>&1
mark "full 512K step: exit $?"; grep -E "^\| tiled" "$R/memory_512k.log"
