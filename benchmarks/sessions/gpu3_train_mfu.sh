#!/usr/bin/env bash
# GPU session 3, call 4 (2x H200): train.py throughput of the Llama-2-7B shape at 128K under ZeRO-3 without
# CPU offload (7B fits 2 H200s: ~61 GB of weights and optimizer state per GPU), zigzag ring and Ulysses.
# Needs .whl carried (deepspeed 0.19.8 and its pure-Python dependencies).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; date
python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic 2>&1 | tail -2
for backend in ${BACKENDS:-zigzag_ring ulysses}; do
  timeout 235 python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens ${SEQ:-131072} \
    --backends "$backend" --configs zero3 --steps 3 --warmup 1 --timeout 225 \
    --json "$OUT/bench_train_zero3_$backend.json" 2>&1 | tee "$OUT/bench_train_zero3_$backend.log" | grep -vE "^\s*$" | tail -6
  date
done
