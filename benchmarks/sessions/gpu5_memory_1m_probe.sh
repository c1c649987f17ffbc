#!/usr/bin/env bash
# Session 5 (2x H200), issue 9. Started in the background by
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu5_memory_1m_probe.sh 560      (carry .whl)
# and followed with `bash benchmarks/sessions/gpu4_run.sh - 560` calls.
# 1. The GPU tests (cuDNN with [B, S, H, D] buffers and head-split calls, new this session) and the HF check,
#    run beside step 2.
# 2. One 1M-token step of a 2-layer Llama-3-8B shape (vocab 128256, GQA 8), every layer input offloaded:
#    its peak minus its model states is the working set W of one layer's backward at 512K local tokens.
# 3. The full 32-layer 1M step, started only when the tests passed and the arithmetic below says it fits:
#    model states of the full model (8.03B x 18 bytes / 2 GPUs) + W + 4 GiB per layer input kept on the GPU,
#    and the offloaded rest in pinned host memory for both ranks.
PART=memory_1m_probe; source benchmarks/sessions/gpu4_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g; grep -E "MemTotal|MemAvailable" /proc/meminfo
  echo "memlock: $(ulimit -l)"; nproc; python -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
} > "$R/machine.txt" 2>&1
(  # small, so they share the GPUs with the 2-layer step (its peak is per-process allocator statistics)
  python -m pytest -q -m gpu tests/ > "$R/gpu_tests.log" 2>&1; echo $? > "$R/gpu_tests.rc"
  mark "gpu tests: exit $(cat "$R/gpu_tests.rc"): $(tail -n 1 "$R/gpu_tests.log")"
  torchrun --nproc_per_node=2 --master_port 29611 benchmarks/check_hf_gpu.py --seq 8192 > "$R/check_hf_gpu.log" 2>&1
  echo $? > "$R/check_hf_gpu.rc"; mark "check_hf_gpu: exit $(cat "$R/check_hf_gpu.rc")"
) &
CHECKS=$!
FLAGS="--tiled-mlp 4096 --fuse-pointwise"
python benchmarks/bench_memory.py --gpus 2 --model "shape:llama3-8b,num_hidden_layers=2" --config zero3 \
  --lengths 1048576 --options "2 layers, all offloaded=$FLAGS --offload-activations" --timeout 420 \
  --json "$R/memory_1m_2layers.json" > "$R/memory_1m_2layers.log" 2>&1
mark "2-layer 1M step: exit $?"; grep -vE "^\s*$" "$R/memory_1m_2layers.log" | tail -4
N=$(python - "$R/memory_1m_2layers.json" <<'EOF'
import json, sys
row = json.load(open(sys.argv[1]))["rows"][0]
if not row["ok"]:
    sys.exit(f"2-layer step failed: {row.get('failure')}")
gib = 2**30
# ZeRO-3 bf16: 18 bytes per parameter (bf16 weight and gradient, fp32 master, fp32 gradient, Adam m and v)
small = (2 * 128256 * 4096 + 2 * 218_112_000 + 8192) * 18 / 2 / gib   # embeddings + 2 layers, over 2 GPUs
full = 8_030_261_248 * 18 / 2 / gib
w = max(row["peak_gpu_gib"], row["reserved_gpu_gib"]) - small
room = 140.0 - 5.0 - full - w                                          # 5 GiB: context, NCCL, fragmentation
keep = max(0, min(32, int(room // 4)))
host = [int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")][0] / 2**20
n = 32 - keep
print(f"W={w:.1f} GiB, full model states {full:.1f}, room {room:.1f} -> keep {keep} on GPU, offload {n} "
      f"({n * 4} GiB pinned per rank, {2 * n * 4} of {host:.0f} GiB available)", file=sys.stderr)
if 2 * n * 4 > host - 12:
    sys.exit("does not fit the host")
print(n)
EOF
) 2>> "$R/timings.txt"
wait $CHECKS; TESTS=$(cat "$R/gpu_tests.rc"); HF=$(cat "$R/check_hf_gpu.rc")
tail -n 2 "$R/timings.txt"
if [ "$TESTS" != 0 ] || [ "$HF" != 0 ] || [ -z "$N" ]; then mark "full 1M step not started"; exit 0; fi
mark "full 1M step: offload $N layers"
python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --config zero3 --lengths 1048576 \
  --options "tiled+offload$N+fused=$FLAGS --offload-activations $N" --timeout 1600 \
  --json "$R/memory_1m.json" > "$R/memory_1m.log" 2>&1
mark "full 1M step: exit $?"; grep -vE "^\s*$" "$R/memory_1m.log" | tail -6
