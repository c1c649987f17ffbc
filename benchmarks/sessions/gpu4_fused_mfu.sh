#!/usr/bin/env bash
# GPU session 4, last 2-GPU call (the budget held one run): the 128K step with --keep-attention and --fuse-pointwise.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic > /dev/null 2>&1
timeout 195 python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3 --variants="--keep-attention --fuse-pointwise" --steps 3 --warmup 1 --timeout 185 \
  --json "$OUT/bench_train_keep_fused.json" > "$OUT/bench_train_keep_fused.log" 2>&1
echo "exit $?"; grep -vE "^\{" "$OUT/bench_train_keep_fused.log" | tail -8; grep -oE '"error": .{0,1500}' "$OUT/bench_train_keep_fused.log" | tail -c 1500
