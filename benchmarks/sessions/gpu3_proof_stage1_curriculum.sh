#!/usr/bin/env bash
# GPU session 3, call 2 (1 H200): proof stage 1 again, as a length curriculum. Trained directly at 2K the
# 26M model stayed at chance on the answers for 3000 steps (gpu3_proof_stage1.sh); at 256 tokens (one needle)
# the CPU runs left chance quickly. So: 256 -> 512 -> 1024 -> 2048, each stage starting from the last model.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}; P=/tmp/proof; mkdir -p "$OUT" "$P"; date
# LENGTH:BATCH:MINUTES:MAX_STEPS:DATASET (the last stage gets a step count it can finish, so its cosine decays)
SCHEDULE=${SCHEDULE:-"256:128:2.0:100000:tiny:answers 512:64:1.5:100000:tiny:answers 1024:32:1.5:100000:tiny:answers+0.05 2048:32:2.0:700:tiny:answers+0.05"}
MODEL=tiny
summary() { python - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
k = max(1, len(rows) // 8)
print("  loss per", k, "steps:", " ".join(f"{sum(r['loss'] for r in rows[i:i + k]) / len(rows[i:i + k]):.3f}" for i in range(0, len(rows), k)),
      f"| {len(rows)} steps, {sum(r['tokens_per_s'] for r in rows[3:]) / max(1, len(rows) - 3):.0f} tok/s")
PY
}
for stage in $SCHEDULE; do
  IFS=: read -r LEN BATCH MIN STEPS D <<< "$stage"
  T0=$(date +%s)
  timeout 300 python train.py --model "$MODEL" --tiny-preset small --seq-length "$LEN" --dataset "$D" \
    --backend data_parallel --batch-size "$BATCH" --lr 1e-3 --warmup-steps 50 --schedule cosine --min-lr-ratio 0.1 \
    --weight-decay 0.0 --max-steps "$STEPS" --time-limit "$MIN" --no-gradient-checkpointing --data-workers 8 \
    --output-dir "$P/s$LEN" > "$P/s$LEN.log" 2>&1
  echo "stage $LEN ($D, batch $BATCH, $MIN min): exit $? after $(( $(date +%s) - T0 ))s"
  summary "$P/s$LEN/log.jsonl"
  MODEL="$P/s$LEN/model"
done
timeout 100 python eval_needle.py --model "$MODEL" --lengths 512 1024 2048 4096 --depth-step 20 --samples 4 \
  --allow-extrapolation --output "$P/needle_short_quick.json" 2>&1 | grep -E "accuracy|Error" | tail -3
python - "$MODEL" "$P" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
from easy_context import models
m, p = sys.argv[1:]
AutoModelForCausalLM.from_pretrained(m, dtype=torch.bfloat16).save_pretrained(f"{p}/xfer/model")
models.load_tokenizer(m).save_pretrained(f"{p}/xfer/model")
PY
for s in "$P"/s*/log.jsonl; do cp "$s" "$P/xfer/log_$(basename "$(dirname "$s")").jsonl"; done
cp "$P"/needle_short_quick.* "$P/xfer/"
tar -C "$P/xfer" -czf "$P/stage1.tgz" . && split -b 15M "$P/stage1.tgz" "$OUT/stage1.tgz.part-"
ls -la "$OUT"; date
