#!/usr/bin/env bash
# Session 9, one H200 (only single-GPU kinds were lent), about 20 minutes:
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu14_session.sh 560    (carry .whl and .ab_base)
# .ab_base/ is `git archive 8521afe` (the code before the K/V memory-order change), git-ignored and carried, so
# that the A/B runs in one hold on one GPU.
# 1. Issue 8: the local causal block as one cuDNN call vs the ring backward's split in three.
# 2. Issue 8: A/B of the emulated 128K Llama-2-7B step (rank 0 of 2, keep + fuse, zero3), each profiled on its
#    last step: before (base) and after K/V travel in their memory order and gradients come back strided as
#    their inputs (no layout copies for the ring's sends and the model's transposes back).
# 3. Issue 11: train_700k.sh's sequence-parallel lengths as rank 0 of 8 (gpu11_emulate8.sh).
PART=session14; source benchmarks/sessions/gpu4_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$R/timings.txt"
python -m pytest -q -m gpu tests/test_kernels.py tests/test_ring.py tests/test_dist_flash.py > "$R/gpu_tests.log" 2>&1
mark "1-GPU tests (the 2-GPU ones skip): exit $?"; tail -n 3 "$R/gpu_tests.log"
python benchmarks/sessions/gpu14_local_block.py > "$R/local_block.log" 2>&1
mark "local block: exit $?"; tail -n 9 "$R/local_block.log"

RUN=(--emulate --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring --configs zero3
     --variants="--keep-attention --fuse-pointwise" --steps 4 --warmup 1 --profile-step 4 --timeout 420)
for side in new base; do
  dir=.; [ $side = base ] && dir=.ab_base
  (cd $dir && python benchmarks/bench_train.py "${RUN[@]}" --json "$R/ab_$side.json") > "$R/ab_$side.log" 2>&1
  mark "A/B $side: exit $?"; grep -E "^\| zero3|ceiling" "$R/ab_$side.log" | cut -c1-200
done
python - "$R" <<'EOF'
import json, sys
for side in ("base", "new"):
    r = json.load(open(f"{sys.argv[1]}/ab_{side}.json"))["rows"][0]
    p = r.get("profile") or {}
    other = p.get("kinds", {}).get("other", {})
    copies = [o for o in p.get("top_ops", []) if o["op"] in ("aten::copy_", "aten::add", "aten::add_")]
    print(side, "step_s", round(r.get("step_s") or 0, 3), "mfu", round(r.get("mfu") or 0, 4),
          "other_s", round(other.get("union_s", 0), 3),
          [(o["op"], o["shapes"][:40], o["count"], round(o["self_s"], 3)) for o in copies])
EOF
mark "A/B summary"

bash benchmarks/sessions/gpu11_emulate8.sh
