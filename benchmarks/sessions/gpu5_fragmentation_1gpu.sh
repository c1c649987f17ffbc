#!/usr/bin/env bash
# Session 5, last minutes (1x H200, counted at half): why the 2-layer 1M step reserved 78 GiB for a 47 GiB
# allocated peak. One GPU at 512K tokens holds the same per-GPU working set (local 512K) without the ring hops.
# The same step with and without expandable segments; the log records the allocator's fragmentation counters.
PART=fragmentation; source benchmarks/sessions/gpu4_env.sh
FLAGS="--tiled-mlp 4096 --fuse-pointwise --offload-activations"
for conf in expandable_segments:True ""; do
  PYTORCH_CUDA_ALLOC_CONF=$conf python benchmarks/bench_memory.py --gpus 1 --model "shape:llama3-8b,num_hidden_layers=2" \
    --config zero3 --lengths 524288 --options "alloc conf '$conf'=$FLAGS" --timeout 300 \
    --json "$R/frag_${conf:-default}.json" > "$R/frag_${conf:-default}.log" 2>&1
  mark "512K 1 GPU 2 layers, '$conf': exit $?"; grep -E "^\{" "$R/frag_${conf:-default}.log" | cut -c1-400
done
