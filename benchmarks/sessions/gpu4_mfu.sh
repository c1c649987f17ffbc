#!/usr/bin/env bash
# Issue 8: the 7B shape at 128K on 2 GPUs under ZeRO-3 (no offload), zigzag ring, with and without
# --keep-attention in one run; the last of 4 steps of each is profiled (not timed), steps 2-3 are timed.
PART=mfu; source benchmarks/sessions/gpu4_env.sh
python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3 --variants="|--keep-attention" --steps 4 --warmup 1 --profile-step 4 --timeout 250 \
  --json "$R/bench_train_keep.json" > "$R/bench_train_keep.log" 2>&1
mark "bench_train keep-attention vs not: exit $?"; grep -vE "^\{" "$R/bench_train_keep.log" | tail -30
