#!/usr/bin/env bash
# Prepared in session 4 for a 2-GPU session given to issue 9, not yet run. Start it in the background with
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu5_memory_1m.sh 560     (carry .whl)
# and collect with `bash benchmarks/sessions/gpu4_run.sh - 560` calls (each under the 10-minute limit).
# Llama-3-8B shape, one training step per length, 2x H200 (140 GiB each), 256 GiB host for both ranks.
# Placement, by arithmetic (RESULTS.md, session 4, issue 9):
#   ZeRO-3 without offload keeps the model states on the GPUs: about 60 GiB per GPU. With ZeRO-3 offload they
#   would take most of the host instead (session 2 saw 78 GiB of host per rank for 7B).
#   Layer-input checkpoints at 512K local tokens are 4 GiB per layer: 28 of 32 layers go to pinned host memory
#   (112 GiB per rank), 4 stay on the GPU; the MLP runs in 4096-token tiles; the loss never makes full logits.
# One 1M step is about 20 minutes (attention ~29 s per layer forward+backward plus the recompute); LENGTHS=1048576
# alone when the session cannot also hold the 512K step (about 6 minutes).
PART=memory_1m; source benchmarks/sessions/gpu4_env.sh
OPTIONS=${OPTIONS:-"zero3+tiled+offload28+fused=--tiled-mlp 4096 --offload-activations 28 --fuse-pointwise"}
python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --config zero3 \
  --lengths "${LENGTHS:-524288,1048576}" --options "$OPTIONS" --timeout 1650 \
  --json "$R/bench_memory_1m.json" --plot "$R/bench_memory_1m.png" > "$R/bench_memory_1m.log" 2>&1
mark "bench_memory 512K/1M: exit $?"; grep -vE "^\s*$" "$R/bench_memory_1m.log" | tail -12
