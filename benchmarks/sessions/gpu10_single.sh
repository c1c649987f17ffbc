#!/usr/bin/env bash
# Prepared in session 7 for a session that is lent only one H200 (not yet run). About 25 minutes on the machine
# (single-GPU kinds count half): start it with
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu10_single.sh 560     (carry .whl)
# then `bash benchmarks/sessions/gpu4_run.sh - 560` calls, each issued at once. Everything is one rank of a 2-GPU
# run emulated on the one GPU (benchmarks/emulate_rank.py): its memory is the real rank's (session 7: 98.34 vs
# 98.3 GiB), its time is compute only.
# 1. Issue 8: the 128K Llama-2-7B step (keep + fuse) with finite data (receives looped back), profiled: session
#    7's 17.4 s was measured on NaN data. Compute-only time and its top kernels and aten ops.
# 2. Issue 9: the length-vs-memory curve at full depth, Llama-3-8B shape, each memory option on and off, at
#    128K and 256K, then 384K and 512K for the two settings without offload (where they run out of memory).
PART=single10; source benchmarks/sessions/gpu4_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$R/timings.txt"
python benchmarks/bench_train.py --emulate --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 4 --warmup 1 --profile-step 4 \
  --timeout 400 --json "$R/emulated_128k_profile.json" > "$R/emulated_128k_profile.log" 2>&1
mark "emulated 128K profile: exit $?"; grep -E "^\| zero3|ceiling|no compute" "$R/emulated_128k_profile.log" | cut -c1-200

export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OPTS="checkpointing=;tiled=--tiled-mlp 4096;offload=--offload-activations;tiled+offload=--tiled-mlp 4096 --offload-activations"
python benchmarks/bench_memory.py --emulate --gpus 2 --model shape:llama3-8b --config zero3 --lengths 131072,262144 \
  --options "$OPTS" --timeout 420 --json "$R/curve_128k_256k.json" --plot "$R/curve_128k_256k.png" \
  > "$R/curve_128k_256k.log" 2>&1
mark "curve 128K-256K: exit $?"; grep -E "^\| " "$R/curve_128k_256k.log" | cut -c1-200
python benchmarks/bench_memory.py --emulate --gpus 2 --model shape:llama3-8b --config zero3 --lengths 393216,524288 \
  --options "checkpointing=;tiled=--tiled-mlp 4096" --timeout 420 --json "$R/curve_384k_512k.json" \
  > "$R/curve_384k_512k.log" 2>&1
mark "curve 384K-512K without offload: exit $?"; grep -E "^\| " "$R/curve_384k_512k.log" | cut -c1-200
python benchmarks/bench_memory.py --from-json "$R/curve_128k_256k.json,$R/curve_384k_512k.json" \
  --plot "$R/curve_emulated.png" > "$R/curve_emulated.log" 2>&1
