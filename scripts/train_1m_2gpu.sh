#!/usr/bin/env bash
# 1M-token sequences for an 8B model on 2 GPUs of 141 GB (H200): the settings measured to fit one full
# training step of Llama-3-8B shape at 1,048,576 tokens (23.7 minutes per step, 80.7 GiB allocated per GPU,
# 114 GiB of pinned host memory per rank; docs/performance.md). The host needs about 230 GiB free.
#   MODEL=<a model already trained at long context> DATA=<rows >= 1M tokens> THETA=<new RoPE base, optional> \
#     bash scripts/train_1m_2gpu.sh
# MODEL=shape:llama3-8b DATA=random STEPS=1 repeats the measurement (random init, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
DATA=${DATA:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_1M}
OUT=${OUT:-output/1m_2gpu}
STEPS=${STEPS:-20}
SEQ=${SEQ:-1048576}
# ZeRO-3 without offload (an 8B model's weights and AdamW state fit 2x 141 GB); MLP in 4096-token tiles;
# the checkpointed inputs of the first 28 of 32 layers (4 GiB each per GPU at 1M) in pinned host memory.
CONFIG=${CONFIG:-accelerate_configs/zero3.yaml}
MEMORY=${MEMORY:---tiled-mlp 4096 --fuse-pointwise --offload-activations 28}
THETA_FLAG=()
[ -n "${THETA:-}" ] && THETA_FLAG=(--rope-theta "$THETA")
accelerate launch --config_file "$CONFIG" --num_processes 2 train.py \
  --model "$MODEL" --dataset "$DATA" --seq-length "$SEQ" --backend zigzag_ring "${THETA_FLAG[@]}" \
  --batch-size 1 --grad-accum 1 --lr 1e-5 --max-steps "$STEPS" --checkpoint-every 5 --resume \
  --output-dir "$OUT" $MEMORY
echo "final model: $OUT/model"
