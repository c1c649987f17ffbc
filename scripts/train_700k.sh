#!/usr/bin/env bash
# EasyContext's progressive recipe for Llama-2-7B on one node of 8 GPUs (80 GB): 32K -> 64K data parallel,
# then 256K -> 512K zigzag ring attention, raising RoPE theta at every stage (about 1M tokens per optimizer
# step, 3.7B tokens in all). Each stage starts from the previous stage's model/ and writes its own.
#   MODEL=meta-llama/Llama-2-7b-hf DATA_64K=... DATA_256K=... DATA_1M=... bash scripts/train_700k.sh
# MODEL=shape:llama2-7b (random init) with DATA_*=random and STEPS_SCALE=0 runs a few steps per stage (benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# torchrun would set 1 thread per process: DeepSpeed's CPU Adam (ZeRO-Offload) needs the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ${GPUS:-8} > 0 ? $(nproc) / ${GPUS:-8} : 1 ))}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATA_64K=${DATA_64K:-yaofu/slimpajama-per-source-length-upsample}
DATA_256K=${DATA_256K:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_256K}
DATA_1M=${DATA_1M:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_1M}
OUT=${OUT:-output/700k}
GPUS=${GPUS:-8}
CONFIG=${CONFIG:-accelerate_configs/zero3_offload.yaml}
STEPS_SCALE=${STEPS_SCALE:-1}     # 0: 3 steps per stage (a dry run of the whole chain)
LR=${LR:-2e-5}
# Compiled RMSNorm/SwiGLU/RoPE: no memory cost, 2.9 MFU points at 128K on 2 GPUs (not measured on 8).
# --keep-attention (6.4 more at 128K) costs 0.5 GiB per layer per 64K local tokens: add it to SPEED if it fits.
# At 700K as rank 0 of 8 (zero3.yaml, emulated on an H200, compute only): 1.25x faster, 75.5 vs 54.0 GiB per
# GPU; so on H200s add it, on 80 GB GPUs only with zero3_offload.yaml's smaller model states (not measured).
SPEED=${SPEED---fuse-pointwise}

steps() { if [ "$STEPS_SCALE" = 0 ]; then echo 3; else echo "$1"; fi; }
stage() {  # name, init model, seq, theta, backend, grad accum, steps, seed, data, [extra flags]
  local name=$1 init=$2 seq=$3 theta=$4 backend=$5 ga=$6 n=$7 seed=$8 data=$9; shift 9
  if [ -d "$OUT/$name/model" ]; then echo "stage $name done: $OUT/$name/model"; return; fi
  accelerate launch --config_file "$CONFIG" --num_processes "$GPUS" train.py \
    --model "$init" --dataset "$data" --seq-length "$seq" --rope-theta "$theta" --backend "$backend" \
    --batch-size 1 --grad-accum "$ga" --lr "$LR" --max-steps "$(steps "$n")" --seed "$seed" \
    --checkpoint-every 50 --resume --output-dir "$OUT/$name" $SPEED "$@"
}

stage 1_32k   "$MODEL"                  32768  1e6   data_parallel 4 1000 42   "$DATA_64K"
stage 2_64k   "$OUT/1_32k/model"        65536  5e6   data_parallel 2 1000 2022 "$DATA_64K"
stage 3_256k  "$OUT/2_64k/model"        262144 1e7   zigzag_ring   4 500  2023 "$DATA_256K"
stage 4_256k  "$OUT/3_256k/model"       262144 2.5e7 zigzag_ring   4 500  2024 "$DATA_256K"
stage 5_256k  "$OUT/4_256k/model"       262144 5e7   zigzag_ring   4 150  2025 "$DATA_256K"
stage 6_512k  "$OUT/5_256k/model"       524288 1e8   zigzag_ring   2 300  2026 "$DATA_1M"
stage 7_512k  "$OUT/6_512k/model"       524288 2.5e8 zigzag_ring   2 90   2027 "$DATA_1M" --lr 1e-5
# EasyContext then set rope_theta to 1e9 in the final config by hand; our evals take --rope-theta 1e9 instead.
echo "final model: $OUT/7_512k/model"
