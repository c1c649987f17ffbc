#!/usr/bin/env bash
# A small recipe for 2 GPUs: extend a 7B model from its native 4K to 64K in two zigzag-ring stages.
#   MODEL=meta-llama/Llama-2-7b-hf DATA=<pre-tokenized or text dataset, rows >= 64K tokens> bash scripts/train_2gpu_64k.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# torchrun would set 1 thread per process: DeepSpeed's CPU Adam (ZeRO-Offload) needs the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ${GPUS:-${NPROC:-2}} > 0 ? $(nproc) / ${GPUS:-${NPROC:-2}} : 1 ))}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATA=${DATA:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_256K}
OUT=${OUT:-output/2gpu_64k}
STEPS=${STEPS:-200}
# ZeRO-3 without offload: a 7B model's weights and AdamW state (~61 GB per GPU over 2) fit an H200 (141 GB) and
# it is the fastest measured 2-GPU setting (docs/performance.md); ZeRO-3 offload is far slower. On 80 GB GPUs
# use CONFIG=accelerate_configs/zero3_offload.yaml.
CONFIG=${CONFIG:-accelerate_configs/zero3.yaml}
# The fastest measured settings (7B shape, 128K, 2x H200; docs/performance.md): keeping attention outputs
# through the recompute (+16 GiB) and fusing the pointwise ops. SPEED=--no-fuse-pointwise turns both off.
SPEED=${SPEED---keep-attention --fuse-pointwise}
run() {  # name, init, seq, theta
  [ -d "$OUT/$1/model" ] && { echo "stage $1 done"; return; }
  accelerate launch --config_file "$CONFIG" --num_processes 2 train.py \
    --model "$2" --dataset "$DATA" --seq-length "$3" --rope-theta "$4" --backend zigzag_ring \
    --grad-accum 8 --lr 2e-5 --max-steps "$STEPS" --checkpoint-every 50 --resume --output-dir "$OUT/$1" $SPEED
}
run 1_32k "$MODEL" 32768 1e6
run 2_64k "$OUT/1_32k/model" 65536 5e6
echo "final model: $OUT/2_64k/model"
