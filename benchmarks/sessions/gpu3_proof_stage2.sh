#!/usr/bin/env bash
# GPU session 3, call 3 (2x H200): proof stage 2 and the evals. The stage-1 model (2K, from
# gpu3_proof_stage1_curriculum.sh) comes in as .proof/stage1.tgz.part-*; RoPE theta 10^4 -> 10^6, fine-tuned
# with zigzag ring attention over both GPUs at 8K then 32K (16x); needle heatmaps of both models at
# 1K-32K and perplexity at 1K-32K. Then, on the time left, bench_longlora on one GPU.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/out}; P=/tmp/proof; mkdir -p "$OUT" "$P/short" "$P/res"; date; T0=$(date +%s)
cat .proof/stage1.tgz.part-* | tar -C "$P/short" -xzf - && ls "$P/short/model" | tr '\n' ' '; echo
LAUNCH=(accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2)
mark() { echo "$(( $(date +%s) - T0 ))s $1" | tee -a "$P/res/timings.txt"; }
summary() { python - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
k = max(1, len(rows) // 8)
print("  loss per", k, "steps:", " ".join(f"{sum(r['loss'] for r in rows[i:i + k]) / len(rows[i:i + k]):.3f}" for i in range(0, len(rows), k)),
      f"| {len(rows)} steps, {sum(r['tokens_per_s'] for r in rows[3:]) / max(1, len(rows) - 3):.0f} tok/s, peak {max(r['peak_gpu_gib'] for r in rows):.1f} GiB")
PY
}
MODEL="$P/short/model"
for stage in ${STAGES:-8192:4:1.0:100 32768:1:2.5:150}; do
  IFS=: read -r LEN BATCH MIN STEPS <<< "$stage"
  timeout 280 "${LAUNCH[@]}" train.py --model "$MODEL" --seq-length "$LEN" --dataset tiny:answers+0.05 \
    --rope-theta 1000000 --backend zigzag_ring --batch-size "$BATCH" --lr 3e-4 --warmup-steps 20 --schedule cosine \
    --min-lr-ratio 0.1 --weight-decay 0.0 --max-steps "$STEPS" --time-limit "$MIN" --data-workers 6 \
    --output-dir "$P/long$LEN" > "$P/res/train_long$LEN.log" 2>&1
  mark "stage 2 at $LEN (zigzag_ring, 2 GPUs, theta 1e6): exit $?"
  summary "$P/long$LEN/log.jsonl"; cp "$P/long$LEN/log.jsonl" "$P/res/log_long$LEN.jsonl"
  MODEL="$P/long$LEN/model"
done
python -c "from easy_context import models, tiny; tiny.save_text_documents('$P/docs', models.load_tokenizer('$MODEL'), 4, 32768 + 64)"
for pair in short:$P/short/model long:$MODEL; do
  name=${pair%%:*}; m=${pair#*:}
  timeout 120 "${LAUNCH[@]}" eval_needle.py --model "$m" --lengths 1024 2048 4096 8192 16384 32768 --depth-step 10 \
    --samples 2 --allow-extrapolation --output "$P/res/needle_$name.json" 2>&1 | grep -E "accuracy|Error|error" | tail -3
  mark "needle heatmap of $name"
done
timeout 100 "${LAUNCH[@]}" eval_ppl.py -m "$P/short/model" -m "$MODEL" --text-dir "$P/docs" \
  --lengths 1024 2048 4096 8192 16384 32768 --allow-extrapolation --output "$P/res/ppl.csv" 2>&1 | grep -vE "it/s|s/it|Loading|Writing" | tail -12
mark "perplexity"
cp "$P/res/needle_short.png" "$P/res/needle_long.png" "$P/res/ppl.png" "$OUT/" 2>/dev/null
LEFT=$(( 540 - $(date +%s) + T0 ))
if [ "${LONGLORA:-1}" = 1 ] && [ "$LEFT" -gt 100 ]; then
  timeout $(( LEFT - 20 )) python benchmarks/bench_longlora.py --seqlens 32768 --layers 8 --warmup 1 --iters 2 \
    --out "$P/res/bench_longlora.json" 2>&1 | grep -vE "^\s*$" | tail -14 | tee "$P/res/bench_longlora.log"
  mark "bench_longlora"
fi
tar -C "$P/res" -czf "$OUT/results.tgz" . ; ls -la "$OUT"; date
