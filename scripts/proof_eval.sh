#!/usr/bin/env bash
# Stage 3 of the RULER-style proof (settings: scripts/proof_env.sh): every run of the comparison on the task suite
# (eval_ruler.py, sequence-parallel over the NPROC GPUs) and on perplexity of held-out real text (eval_ppl.py),
# at SHORT, 4 x SHORT, .. up to LONG, then side by side:
#   stage1     the stage-1 model as trained (RoPE unchanged: past SHORT it extrapolates)
#   theta      no training, RoPE base raised by the NTK-aware rule, 10000 * FACTOR^(d/(d-2)) (d = head_dim 64)
#   yarn       no training, YaRN by FACTOR
#   dynamic    no training, dynamic NTK by FACTOR
#   extended   the sequence-parallel fine-tune (scripts/proof_extend.sh)
#     bash scripts/proof_eval.sh    # resumes: only what a run's results lack is scored (RUNS=yarn ...: some runs only)
source "$(dirname "$0")/proof_env.sh"
SAMPLES=${SAMPLES:-2}
DEPTH_STEP=${DEPTH_STEP:-50}  # evidence at depths 0, 50 and 100%
SCORING=${SCORING:-greedy}   # every run the same: exact greedy decoding, a KV cache on one process (eval_ruler.py)
LENGTHS=${LENGTHS:-$(python3 -c "print(*[$SHORT*4**i for i in range(20) if $SHORT*4**i <= $LONG])")}  # SHORT, x4, ..
THETA_NTK=$(python3 -c "print(f'{10000 * $FACTOR ** (64 / 62):.0f}')")
RUNS=${RUNS:-"stage1 theta yarn dynamic extended"}
for run in $RUNS; do
  case $run in
    stage1) M=$OUT/stage1/model; ROPE=(--allow-extrapolation) ;;
    theta) M=$OUT/stage1/model; ROPE=(--rope-theta "$THETA_NTK") ;;
    yarn) M=$OUT/stage1/model; ROPE=(--rope-scaling "yarn:factor=$FACTOR") ;;
    dynamic) M=$OUT/stage1/model; ROPE=(--rope-scaling "dynamic:factor=$FACTOR") ;;
    extended) M=$OUT/extended/model; ROPE=() ;;
    *) echo "unknown run $run: use stage1 theta yarn dynamic extended" >&2; exit 1 ;;
  esac
  # both scripts resume: what an earlier (cut) run scored is kept, only what is missing runs
  "${LAUNCH[@]}" eval_ruler.py --model "$M" "${ROPE[@]}" --tasks $TASKS --lengths $LENGTHS --haystack "$TEXT" \
    --samples "$SAMPLES" --depth-step "$DEPTH_STEP" --scoring "$SCORING" --output "$OUT/ruler/$run.json"
  mark "suite: $OUT/ruler/${run}_summary.png"
  "${LAUNCH[@]}" eval_ppl.py -m "$M" "${ROPE[@]}" --real-text "$TEXT" --lengths $LENGTHS --output "$OUT/ppl/$run.csv"
  mark "perplexity: $OUT/ppl/$run.csv"
done
python3 - "$OUT/ppl" $RUNS <<'PY'  # every run's perplexity on one plot, named by run
import json, sys
from easy_context.eval.plots import perplexity_plot
folder, runs = sys.argv[1], sys.argv[2:]
rows, header = [], ""
for run in runs:
    with open(f"{folder}/{run}.json") as f:
        data = json.load(f)
    rows += [dict(r, model=run) for r in data["rows"]]
    header = data.get("header", header)
print("wrote", perplexity_plot(rows, f"{folder}/comparison.png", header))
PY
python3 eval_ruler.py --compare $(for run in $RUNS; do echo "$OUT/ruler/$run.json"; done) --output "$OUT/ruler/comparison"
mark "comparison: $OUT/ruler/comparison.png and comparison_tasks.csv"
