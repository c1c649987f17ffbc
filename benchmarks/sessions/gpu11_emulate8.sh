#!/usr/bin/env bash
# Issue 11 on one H200, prepared in session 7 (not yet run): what one GPU can say about the 8-GPU runs while the
# 8-GPU kind is not lent. About 12 minutes on the machine (single-GPU kinds count half):
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu11_emulate8.sh 560      (carry .whl)
# Rank 0 of 8 emulated (benchmarks/emulate_rank.py): per-GPU peak memory as the real rank (session 7: 98.34 vs
# 98.3 GiB at 2 GPUs) and compute-only step time, an upper bound on the real tokens/s; no communication.
# train_700k.sh's sequence-parallel lengths on the Llama-2-7B shape, zero3 (gpu8_x8.sh part 1's settings).
PART=emulate8; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python benchmarks/bench_train.py --emulate --gpus 8 --model shape:llama2-7b --seqlens 262144,524288,716800 \
  --backends zigzag_ring --configs zero3 --variants="--fuse-pointwise" --steps 2 --warmup 1 --timeout 700 \
  --json "$R/emulated8_train.json" > "$R/emulated8_train.log" 2>&1
mark "emulated rank 0 of 8, 256K-700K: exit $?"; grep -E "^\| zero3|ceiling" "$R/emulated8_train.log" | cut -c1-200
