#!/usr/bin/env bash
# Issue 11, prepared in session 6 for an 8x H200 machine (`nvidia-h200-x8`), which has not been lent so far; not
# run. Each part is a separate device call of its own (the whole list is more than one 30-minute session):
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu8_x8.sh 560      (carry .whl; PARTS=... to choose)
# 1 train: train_700k.sh's sequence-parallel lengths (256K, 512K, 700K) on the Llama-2-7B shape, a few steps each,
#          tokens/s next to EasyContext's 8x A100 table, MFU and peak memory.
# 2 attention: bench_attention.py at P = 8: zigzag, ring, Ulysses, USP 4x2 and 2x4, dist-flash, context_parallel.
# 3 memory: bench_memory.py at P = 8, Llama-3-8B shape, upward from 2M tokens in 512K steps until the first
#          failure. A step's attention time per GPU grows as S^2/P: 2M on 8 GPUs costs what 1M on 2 did (1422 s),
#          so each length beyond 2M takes longer than one device command may run (600 s) unless it is started in
#          the background (gpu4_run.sh) and waited on.
# 4 needle: eval_needle.py over 8 GPUs at 1M tokens, one cell, on a random Llama-3-8B shape (the fit and the time).
PART=x8; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
for part in ${PARTS:-train attention memory needle}; do
  case $part in
  train)
    python benchmarks/bench_train.py --gpus 8 --model shape:llama2-7b --seqlens 262144,524288,716800 \
      --backends zigzag_ring --configs zero3 --variants="--fuse-pointwise" --steps 3 --warmup 1 --timeout 900 \
      --json "$R/x8_train.json" > "$R/x8_train.log" 2>&1 ;;
  attention)
    torchrun --nproc_per_node=8 benchmarks/bench_attention.py --seqlens 131072,524288 --kernels cudnn \
      --backends zigzag_ring,ring,ulysses,usp:4x2,usp:2x4,dist_flash --json "$R/x8_attention.json" \
      > "$R/x8_attention.log" 2>&1 ;;
  memory)
    python benchmarks/bench_memory.py --gpus 8 --model shape:llama3-8b --config zero3 \
      --search 2097152,4194304,524288 --timeout 3000 \
      --options "tiled+offload+fused=--tiled-mlp 4096 --fuse-pointwise --offload-activations" \
      --json "$R/x8_memory.json" --plot "$R/x8_memory.png" > "$R/x8_memory.log" 2>&1 ;;
  needle)
    torchrun --nproc_per_node=8 eval_needle.py --model shape:llama3-8b --tokenizer tiny --allow-extrapolation \
      --lengths 1048576 --depths 50 --samples 1 --output "$R/x8_needle_1m.json" > "$R/x8_needle.log" 2>&1 ;;
  esac
  mark "$part: exit $?"
done
