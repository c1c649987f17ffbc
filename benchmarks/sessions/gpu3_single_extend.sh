#!/usr/bin/env bash
# GPU session 3, after the budget for 2 GPUs ran out (1 H200, counted at half): stage 2 again on one GPU.
# The 2-GPU extension (gpu3_final.sh: theta 10^6 straight at 8K then 32K, lr 5e-4) relearned the prose
# (perplexity 24.0 -> 4.3 at 32K) but lost retrieval everywhere, even at 1K. Here: a gentler theta
# (2e5, about the NTK-aware value for 16x with head_dim 64), first re-fitted at the old length (2K, where
# answers are dense), then 8K and 32K; plain attention on one GPU (no second GPU for zigzag).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/out}; P=/tmp/proof; R=$P/res; mkdir -p "$OUT" "$P/short" "$R"; date; T0=$(date +%s)
cat .proof/stage1.tgz.part-* | tar -C "$P/short" -xzf -
mark() { echo "$(( $(date +%s) - T0 ))s $1" | tee -a "$R/timings.txt"; }
MODEL="$P/short/model"
for stage in ${STAGES:-2048:32:1.5:800 8192:8:1.5:500 32768:2:1.8:400}; do
  IFS=: read -r LEN BATCH MIN STEPS <<< "$stage"
  timeout 200 python train.py --model "$MODEL" --seq-length "$LEN" --dataset tiny:answers+0.05 \
    --rope-theta ${THETA:-200000} --backend data_parallel --batch-size "$BATCH" --lr 3e-4 --warmup-steps 20 \
    --schedule cosine --min-lr-ratio 0.1 --weight-decay 0.0 --max-steps "$STEPS" --time-limit "$MIN" --data-workers 8 \
    --output-dir "$P/ext$LEN" > "$R/train_ext$LEN.log" 2>&1
  mark "extension at $LEN (1 GPU, theta ${THETA:-200000}): exit $?"
  python - "$P/ext$LEN/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
k = max(1, len(rows) // 8)
print("  loss per", k, "steps:", " ".join(f"{sum(r['loss'] for r in rows[i:i + k]) / len(rows[i:i + k]):.3f}" for i in range(0, len(rows), k)),
      f"| {len(rows)} steps, {sum(r['tokens_per_s'] for r in rows[3:]) / max(1, len(rows) - 3):.0f} tok/s")
PY
  cp "$P/ext$LEN/log.jsonl" "$R/log_ext$LEN.jsonl"; MODEL="$P/ext$LEN/model"
done
python -c "from easy_context import models, tiny; tiny.save_text_documents('$P/docs', models.load_tokenizer('$MODEL'), 4, 32768 + 64)"
timeout 90 python eval_needle.py --model "$MODEL" --lengths 1024 2048 4096 8192 16384 32768 --depth-step 10 \
  --samples 2 --allow-extrapolation --output "$R/needle_ext.json" > "$R/eval_needle_ext.log" 2>&1
mark "needle heatmap: exit $?"; grep -E "accuracy|Error" "$R/eval_needle_ext.log" | tail -2
timeout 60 python eval_ppl.py -m "$P/short/model" -m "$MODEL" --text-dir "$P/docs" \
  --lengths 1024 2048 4096 8192 16384 32768 --allow-extrapolation --output "$R/ppl_ext.csv" > "$R/eval_ppl_ext.log" 2>&1
mark "perplexity: exit $?"; grep -E "ppl=|Error" "$R/eval_ppl_ext.log" | tail -6
cp "$R/needle_ext.png" "$R/ppl_ext.png" "$OUT/" 2>/dev/null; tar -C "$R" -czf "$OUT/results_ext.tgz" .; ls -la "$OUT"; date
