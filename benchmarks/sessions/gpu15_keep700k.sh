#!/usr/bin/env bash
# Issue 11, session 9, the rest of the gpu14 hold (one H200): train_700k.sh's last length, 700K, as rank 0 of 8
# with --keep-attention added to the recipe's --fuse-pointwise: whether it fits and what it is worth there.
PART=keep700k; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python benchmarks/bench_train.py --emulate --gpus 8 --model shape:llama2-7b --seqlens 716800 \
  --backends zigzag_ring --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 2 --warmup 1 \
  --timeout 560 --json "$R/emulated8_keep700k.json" > "$R/emulated8_keep700k.log" 2>&1
mark "emulated rank 0 of 8, 700K keep: exit $?"; grep -E "^\| zero3|ceiling" "$R/emulated8_keep700k.log" | cut -c1-200
