#!/usr/bin/env bash
# Stage 2 of the RULER-style proof (settings: scripts/proof_env.sh): the stage-1 model extended from SHORT to
# LONG tokens by a sequence-parallel fine-tune: zigzag ring attention splits every row over the NPROC GPUs (on one
# GPU the rows run whole: the same math, whose sequence-parallel exactness the tests prove), YaRN by LONG/SHORT
# (THETA=...: a raised RoPE base instead), on the task mixture at growing lengths up to LONG.
#     bash scripts/proof_extend.sh
source "$(dirname "$0")/proof_env.sh"
# Stages are LENGTH:BATCH:STEPS[:MINUTES] (as in proof_stage1.sh); the RoPE change goes to the first one, and
# later stages inherit it from the config. The measured runs: 64x (LONG 131072) and 16x (LONG 32768).
if [ "$LONG" -gt 32768 ]; then DEFAULT="8192:8:300 32768:2:150 $LONG:1:150"; else DEFAULT="8192:8:300 $LONG:1:300"; fi
EXTEND=${EXTEND:-$DEFAULT}
LR=${LR:-1e-4}  # a tenth of stage 1's: keep what the model knows
BACKEND=${BACKEND:-zigzag_ring}
MODEL=$OUT/stage1/model
[ -d "$MODEL" ] || { echo "no stage-1 model at $MODEL: run scripts/proof_stage1.sh first" >&2; exit 1; }
if [ -n "${THETA:-}" ]; then ROPE=(--rope-theta "$THETA"); else ROPE=(--rope-scaling "yarn:factor=$FACTOR"); fi
for s in $EXTEND; do
  IFS=: read -r LEN BATCH STEPS MINUTES <<< "$s"
  if [ ! -d "$OUT/extend$LEN/model" ]; then
    DATA=$(rows "$LEN" $(( BATCH * STEPS )))  # every process of the SP group reads the same rows
    mark "training rows: $DATA"
    "${LAUNCH[@]}" train.py --model "$MODEL" --dataset "$DATA" --seq-length "$LEN" "${ROPE[@]}" --backend "$BACKEND" \
      --batch-size "$BATCH" --lr "$LR" --warmup-steps 20 --max-steps "$STEPS" ${MINUTES:+--time-limit "$MINUTES"} \
      --schedule cosine --min-lr-ratio 0.1 --weight-decay 0.0 --no-fuse-pointwise --data-workers 4 \
      --output-dir "$OUT/extend$LEN"
  fi
  MODEL=$OUT/extend$LEN/model; ROPE=(); mark "extended to $MODEL at $LEN tokens ($BACKEND over $NPROC process(es))"
done
ln -sfn "extend$LEN" "$OUT/extended"
