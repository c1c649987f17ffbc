#!/usr/bin/env bash
# Issue 9, prepared in session 8 (not run: the machine hold and the budget ended first). One H200, about 20
# minutes on the machine; start it alone (a fresh hold) with
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu12_512k.sh 560      (carry .whl)
# then `bash benchmarks/sessions/gpu4_run.sh - 560` calls, each issued at once.
# The full-depth Llama-3-8B curve's missing points, as rank 0 of 2 emulated (benchmarks/emulate_rank.py):
# tiled MLP at 512K (extrapolated 135-140 GiB of 140.4: too close to call), plain checkpointing at 512K again
# for its failure message (session 8 lost it), and activation offload alone at 384K and 512K.
PART=512k; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# Most informative first (session 9 had about 20 minutes of hold left for it): does 512K fit with tiling alone,
# with offload alone; then the failure message without either; offload at 384K last.
for O in "tiled=--tiled-mlp 4096@524288" "offload=--offload-activations@524288" "checkpointing=@524288" \
         "offload384=--offload-activations@393216"; do
  N=${O%%=*}; L=${O##*@}; O=${O%@*}
  python benchmarks/bench_memory.py --emulate --gpus 2 --model shape:llama3-8b --config zero3 --lengths "$L" \
    --options "${O/offload384=/offload=}" --timeout 560 --json "$R/curve_$N.json" > "$R/curve_$N.log" 2>&1
  mark "$N at $L: exit $?"; grep -E "^\| |Error|out of memory" "$R/curve_$N.log" | cut -c1-200
done
