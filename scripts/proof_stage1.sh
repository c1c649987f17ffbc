#!/usr/bin/env bash
# Stage 1 of the RULER-style proof (settings: scripts/proof_env.sh): a model trained from scratch at SHORT tokens on
# real text mixed with the task generators, until it solves the tasks within its length. Data parallel (the
# rows fit one GPU); a length curriculum, as scripts/demo.sh found retrieval needs one (straight at 2K the 26M
# model never left chance on the answers). Then the suite at SHORT/4..SHORT: the bar stage 1 must pass.
#     bash scripts/proof_stage1.sh            # GPUs: the small preset, 256 -> 2048 tokens
source "$(dirname "$0")/proof_env.sh"
# Stages are LENGTH:BATCH:STEPS[:MINUTES] (BATCH per process; MINUTES: stop there, as --time-limit); each stage's
# rows are written once, as many as it reads.
GROW=${GROW:-"256:128:900 512:64:800 1024:32:700 2048:32:1000"}
LR=${LR:-1e-3}
[ -f "$OUT/init/config.json" ] || python3 -c "from easy_context.world.default import build_default_world
build_default_world('$OUT/init', preset='$PRESET', max_position_embeddings=256)"
MODEL=$OUT/init
for s in $GROW; do
  IFS=: read -r LEN BATCH STEPS MINUTES <<< "$s"
  if [ ! -d "$OUT/grow$LEN/model" ]; then
    DATA=$(rows "$LEN" $(( BATCH * STEPS * NPROC )))
    mark "training rows: $DATA"
    "${LAUNCH[@]}" train.py --model "$MODEL" --dataset "$DATA" --seq-length "$LEN" --backend data_parallel \
      --batch-size "$BATCH" --lr "$LR" --warmup-steps 50 --max-steps "$STEPS" ${MINUTES:+--time-limit "$MINUTES"} \
      --schedule cosine --min-lr-ratio 0.1 --weight-decay 0.0 --no-gradient-checkpointing --no-fuse-pointwise \
      --data-workers 4 --output-dir "$OUT/grow$LEN"
  fi
  MODEL=$OUT/grow$LEN/model; mark "trained $MODEL at $LEN tokens"
done
[ "$LEN" = "$SHORT" ] || echo "warning: the last GROW stage is $LEN tokens, SHORT is $SHORT (the extension factor)" >&2
ln -sfn "grow$LEN" "$OUT/stage1"
IN_WINDOW=${IN_WINDOW-"$(( SHORT / 2 )) $SHORT"}  # cwe's list needs about 1K tokens of the built-in tokenizer; "": skip
[ -z "$IN_WINDOW" ] && exit 0
"${LAUNCH[@]}" eval_ruler.py --model "$OUT/stage1/model" --tasks $TASKS --lengths $IN_WINDOW \
  --haystack "$TEXT" --samples 4 --output "$OUT/ruler/stage1_in_window.json"
mark "stage 1 within its length: $OUT/ruler/stage1_in_window_summary.png"
