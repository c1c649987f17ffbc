#!/usr/bin/env bash
# GPU session 3, last call (2x H200), everything that was left in one command (the device budget allows one):
#  0. a 2-GPU needle eval of the stage-1 model at 1K, whose log says why call 3's evals failed (single-process
#     evals are the fallback);
#  1. proof stage 2 with enough steps (call 3 stopped at its max-steps after 30 s per stage): RoPE theta
#     10^4 -> 10^6, zigzag ring over both GPUs, 8K then 32K, data capped at 8 needles per document;
#  2. needle heatmaps of both models at 1K-32K, perplexity at 1K-32K;
#  3. on the time left, train.py throughput of the Llama-2-7B shape at 128K under ZeRO-3 (no offload), zigzag.
# Carries .proof (stage-1 model) and .whl (deepspeed).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/out}; P=/tmp/proof; R=$P/res; mkdir -p "$OUT" "$P/short" "$R"; date; T0=$(date +%s)
cat .proof/stage1.tgz.part-* | tar -C "$P/short" -xzf -
(python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic > "$R/pip.log" 2>&1 &)
LAUNCH=(accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2)
mark() { echo "$(( $(date +%s) - T0 ))s $1" | tee -a "$R/timings.txt"; }
timeout 90 "${LAUNCH[@]}" eval_needle.py --model "$P/short/model" --lengths 1024 --depth-step 50 --samples 1 \
  --allow-extrapolation --output "$R/check.json" > "$R/eval_check.log" 2>&1
CHECK=$?; mark "2-GPU eval check: exit $CHECK"
grep -E "Error|error|accuracy" "$R/eval_check.log" | grep -vE "error_file|elastic/errors" | head -6
EVAL=("${LAUNCH[@]}"); [ "$CHECK" = 0 ] || EVAL=(python)
MODEL="$P/short/model"
for stage in ${STAGES:-8192:4:1.3:500 32768:1:2.0:800}; do
  IFS=: read -r LEN BATCH MIN STEPS <<< "$stage"
  timeout 240 "${LAUNCH[@]}" train.py --model "$MODEL" --seq-length "$LEN" --dataset tiny:answers+0.05 \
    --rope-theta 1000000 --backend zigzag_ring --batch-size "$BATCH" --lr 5e-4 --warmup-steps 20 --schedule cosine \
    --min-lr-ratio 0.1 --weight-decay 0.0 --max-steps "$STEPS" --time-limit "$MIN" --data-workers 6 \
    --output-dir "$P/long$LEN" > "$R/train_long$LEN.log" 2>&1
  mark "stage 2 at $LEN (zigzag_ring, 2 GPUs, theta 1e6): exit $?"
  python - "$P/long$LEN/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
k = max(1, len(rows) // 8)
print("  loss per", k, "steps:", " ".join(f"{sum(r['loss'] for r in rows[i:i + k]) / len(rows[i:i + k]):.3f}" for i in range(0, len(rows), k)),
      f"| {len(rows)} steps, {sum(r['tokens_per_s'] for r in rows[3:]) / max(1, len(rows) - 3):.0f} tok/s")
PY
  cp "$P/long$LEN/log.jsonl" "$R/log_long$LEN.jsonl"; MODEL="$P/long$LEN/model"
done
python -c "from easy_context import models, tiny; tiny.save_text_documents('$P/docs', models.load_tokenizer('$MODEL'), 4, 32768 + 64)"
for pair in short:$P/short/model long:$MODEL; do
  name=${pair%%:*}; m=${pair#*:}
  timeout 100 "${EVAL[@]}" eval_needle.py --model "$m" --lengths 1024 2048 4096 8192 16384 32768 --depth-step 10 \
    --samples 2 --allow-extrapolation --output "$R/needle_$name.json" > "$R/eval_needle_$name.log" 2>&1
  mark "needle heatmap of $name (${EVAL[0]}): exit $?"; grep -E "accuracy|Error" "$R/eval_needle_$name.log" | tail -2
done
timeout 80 "${EVAL[@]}" eval_ppl.py -m "$P/short/model" -m "$MODEL" --text-dir "$P/docs" \
  --lengths 1024 2048 4096 8192 16384 32768 --allow-extrapolation --output "$R/ppl.csv" > "$R/eval_ppl.log" 2>&1
mark "perplexity: exit $?"; grep -E "ppl=|Error" "$R/eval_ppl.log" | tail -12
cp "$R/needle_short.png" "$R/needle_long.png" "$R/ppl.png" "$OUT/" 2>/dev/null
tar -C "$R" -czf "$OUT/results.tgz" .
LEFT=$(( 585 - $(date +%s) + T0 ))
if [ "$LEFT" -gt 120 ]; then
  timeout $(( LEFT - 5 )) python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 \
    --backends zigzag_ring --configs zero3 --steps 3 --warmup 1 --timeout $(( LEFT - 15 )) \
    --json "$R/bench_train_zero3_zigzag.json" > "$R/bench_train.log" 2>&1
  mark "bench_train (zigzag, 128K, zero3): exit $?"; grep -vE "^\s*$" "$R/bench_train.log" | cut -c1-600 | tail -5
  tar -C "$R" -czf "$OUT/results.tgz" .
fi
ls -la "$OUT"; date
