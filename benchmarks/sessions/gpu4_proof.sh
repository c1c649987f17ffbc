#!/usr/bin/env bash
# Issue 7: scripts/demo.sh on 2 GPUs from the stage-1 model of session 3 (2K, carried in .proof): its GROW stage
# is skipped because the model is already there; it extends by YaRN x16 with zigzag ring on both GPUs (8K, 32K),
# then runs both needle heatmaps and the perplexity sweep with 2 processes.
PART=proof; source benchmarks/sessions/gpu4_env.sh
D=/tmp/s4/demo; mkdir -p "$D/grow2048"
[ -d "$D/grow2048/model" ] || { cat .proof/stage1.tgz.part-* | tar -C "$D/grow2048" -xzf -; }
OUT=$D GROW="2048:32:700" bash scripts/demo.sh > "$R/demo.log" 2>&1
mark "demo.sh: exit $?"; cp "$D"/timings.txt "$R/demo_timings.txt"
for f in "$D"/extend*/log.jsonl; do cp "$f" "$R/log_$(basename "$(dirname "$f")").jsonl"; done
cp "$D"/needle_*.json "$D"/needle_*.png "$D"/needle_*.csv "$D"/ppl.* "$R/" 2>/dev/null
grep -E "accuracy|ppl|Error|error" "$R/demo.log" | grep -v error_file | tail -20
