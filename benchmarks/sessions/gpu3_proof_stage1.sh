#!/usr/bin/env bash
# GPU session 3, call 1 (1 H200): proof stage 1. The 26M "small" model from scratch at 2K tokens on
# tiny:answers+0.05 (loss on every answer and 5% of the other tokens), then its needle accuracy at 1K-4K.
# The model comes back (bf16, tar split in 15 MB parts) for stage 2 on 2 GPUs (gpu3_proof_stage2.sh).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}; P=/tmp/proof; mkdir -p "$OUT" "$P"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date
T0=$(date +%s)
timeout 540 python train.py --tiny-preset small --seq-length 2048 --dataset tiny:answers+0.05 \
  --backend data_parallel --batch-size 32 --lr 1e-3 --warmup-steps 100 --schedule cosine --min-lr-ratio 0.1 \
  --weight-decay 0.0 --max-steps 3000 --time-limit 6.5 --no-gradient-checkpointing --data-workers 8 \
  --output-dir "$P/short" > "$P/stage1_stdout.log" 2>&1
echo "stage 1 exit $? after $(( $(date +%s) - T0 ))s"
grep -v "^\s*$" "$P/stage1_stdout.log" | tr '\r' '\n' | grep -E "world|done|Error|error" | tail -5
python - "$P/short/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for i in range(0, len(rows), max(1, len(rows) // 15)):
    r = rows[i]; print(f"step {r['step']} loss {r['loss']:.4f} lr {r['lr']:.2e} tok/s {r['tokens_per_s']:.0f}")
r = rows[-1]; print(f"last step {r['step']} loss {r['loss']:.4f}; mean tok/s {sum(x['tokens_per_s'] for x in rows[5:]) / max(1, len(rows) - 5):.0f}")
PY
T1=$(date +%s)
timeout 150 python eval_needle.py --model "$P/short/model" --lengths 1024 2048 4096 --depth-step 20 --samples 4 \
  --allow-extrapolation --output "$P/needle_short_quick.json" 2>&1 | grep -vE "it/s|s/it" | tail -8
echo "needle eval $(( $(date +%s) - T1 ))s"
python - "$P" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
from easy_context import models
p = sys.argv[1]
AutoModelForCausalLM.from_pretrained(f"{p}/short/model", dtype=torch.bfloat16).save_pretrained(f"{p}/xfer/model")
models.load_tokenizer(f"{p}/short/model").save_pretrained(f"{p}/xfer/model")
PY
cp "$P/short/log.jsonl" "$P/stage1_stdout.log" "$P"/needle_short_quick.* "$P/xfer/"
tar -C "$P/xfer" -czf "$P/stage1.tgz" . && split -b 15M "$P/stage1.tgz" "$OUT/stage1.tgz.part-"
ls -la "$OUT"; date
