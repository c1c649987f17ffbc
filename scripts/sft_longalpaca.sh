#!/usr/bin/env bash
# LongLoRA's supervised fine-tuning on long instructions (LongAlpaca), on any instruction file in that format:
# a .json list or .jsonl of {"instruction", "input", "output"} (or chat "messages" with PROMPT=chat).
#   bash scripts/sft_longalpaca.sh LongAlpaca-12k.json [more train.py flags]
#   MODEL=meta-llama/Llama-2-7b-chat-hf NPROC=8 bash scripts/sft_longalpaca.sh LongAlpaca-12k.json
# Nothing is downloaded here beyond what you point at: the file is yours (LongAlpaca-12k.json is on the hub as
# Yukang/LongAlpaca-12k), and MODEL loads as train.py loads any model.
# LongLoRA's setting (its supervised-fine-tune.py and README): Llama-2-chat, LongAlpaca's Llama-2 [INST] prompt,
# loss on the responses only, 32K tokens, linear position interpolation by ceil(32768 / 4096) = 8, LoRA+ (r=8,
# alpha=16, embeddings and norms trained), S²-Attn in training, lr 2e-5 constant after 20 warmup steps, no weight
# decay, 8 GPUs x 8 accumulated rows = 64 examples per step, 5 epochs (12K examples: about 940 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/sft_longalpaca.sh INSTRUCTIONS.json [more train.py flags]}
shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
  NPROC=${NPROC:-2}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
OUT=${OUT:-output/sft_longalpaca}
SEQ=${SEQ:-32768}
STEPS=${STEPS:-940}
GRAD_ACCUM=${GRAD_ACCUM:-8}
# Linear interpolation for a 4K model at 32K; for another model use ceil(SEQ / its max_position_embeddings),
# or ROPE= to keep the model's RoPE (a model already trained at SEQ).
ROPE=${ROPE-linear:factor=8}
# s2attn: S²-Attn, LongLoRA's training attention (evaluation runs full attention); BACKEND=zigzag_ring (or
# ulysses, data_parallel) trains with exact full attention instead.
BACKEND=${BACKEND:-s2attn}
# Ranks per sequence: LongLoRA ran each 32K row on one GPU (data parallel); SP=2 or more splits every row over
# that many GPUs when one does not hold it (with S²-Attn, each rank's share must be whole attention groups).
SP=${SP:-1}
# LongLoRA's rows: one example each, right-padded. PACK=1 packs several into a row instead (position ids
# restart at each example; needs an exact backend, which keeps the examples apart).
PACK=${PACK:-0}
PROMPT=${PROMPT:-llama2}
CONFIG=${CONFIG:-accelerate_configs/zero3.yaml}
ROPE_FLAG=()
[ -n "$ROPE" ] && ROPE_FLAG=(--rope-scaling "$ROPE")
ROWS=(--one-example-per-row)
[ "$PACK" = 1 ] && ROWS=()
accelerate launch --config_file "$CONFIG" --num_processes "$NPROC" train.py \
  --model "$MODEL" --dataset "$DATA" --prompt-format "$PROMPT" "${ROWS[@]}" --seq-length "$SEQ" "${ROPE_FLAG[@]}" \
  --backend "$BACKEND" --sp-size "$SP" --lora-rank 8 --lora-alpha 16 --batch-size 1 --grad-accum "$GRAD_ACCUM" \
  --lr 2e-5 --warmup-steps 20 --schedule constant --weight-decay 0 --max-steps "$STEPS" --checkpoint-every 50 \
  --resume --output-dir "$OUT" "$@"
echo "final model: $OUT/model"
