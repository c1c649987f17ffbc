#!/usr/bin/env bash
# Llama-3.1-8B on ONE GPU at long context, full fine-tuning, exact: ZeRO-3 with half of the optimizer state on the
# CPU (accelerate_configs/zero3_offload_optimizer.yaml: the whole state offloaded needs about 150 GiB of host
# memory, half of it 90 GiB), tiled MLP, fused pointwise kernels, gradient checkpointing.
#   MODEL=meta-llama/Llama-3.1-8B DATA=... bash scripts/train_8b_1gpu.sh
#   MODEL=shape:llama3-8b DATA=random STEPS=1 bash scripts/train_8b_1gpu.sh     # random-init shape: a timing run
# Measured on one H200 (139 GiB) with 125 GiB of host memory (docs/performance.md): at 256K 215 s a step, 125.2 GiB
# GPU, 97.5 GiB host; at 128K 69.4 s, 86.1 GiB GPU. The longest so far, 384K, keeps one layer input per 2 layers:
#   SEQ=393216 MEMORY="--tiled-mlp 4096 --fuse-pointwise --layers-per-checkpoint 2"   # 466 s a step, 118.6 GiB GPU
# At 256K with 8 layer inputs offloaded the host ran out.
# Up to 32K no offload is needed: the DDP config (float32 weights, bf16 gradient storage) took 5.16 s a step and
# 123.3 GiB at 32K, where HF + Liger ran out of memory:
#   accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 1 train.py --model ... --seq-length 32768
# train.py refuses, before loading, a ZeRO-3 state plus offloaded activations that the host cannot hold, and
# names the "ratio" that fits.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}  # DeepSpeed's CPU Adam runs on these
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?"set DATA to a dataset of rows of at least SEQ tokens (a hub name or a path), or random"}
SEQ=${SEQ:-262144} STEPS=${STEPS:-500} OUT=${OUT:-output/8b_1gpu}
# --offload-activations N moves N layer inputs (SEQ x 4096 x 2 bytes each) to pinned host memory
MEMORY=${MEMORY:---tiled-mlp 4096 --fuse-pointwise}
# shellcheck disable=SC2086  # MEMORY holds several flags
accelerate launch --config_file accelerate_configs/zero3_offload_optimizer.yaml --num_processes 1 train.py \
  --model "$MODEL" --dataset "$DATA" --seq-length "$SEQ" --batch-size 1 --lr 2e-5 \
  --max-steps "$STEPS" --checkpoint-every 50 --resume --output-dir "$OUT" $MEMORY
