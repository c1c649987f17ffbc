#!/usr/bin/env bash
# Prepared in session 4 for the next 2-GPU session (issue 8), not yet run: the 128K step with the fastest flags
# under accelerate's "auto" ZeRO-3 buckets (0.9 h^2 = 15M parameters, smaller than one 7B MLP matrix) and
# under 5e8-parameter buckets, in one run, the last step of each profiled. Carry .whl.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic > /dev/null 2>&1
python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 131072 --backends zigzag_ring \
  --configs zero3,benchmarks/configs/zero3_big_buckets.yaml --variants="--keep-attention --fuse-pointwise" \
  --steps 4 --warmup 1 --profile-step 4 --timeout 270 --json "$OUT/bench_train_buckets.json" \
  > "$OUT/bench_train_buckets.log" 2>&1
echo "exit $?"; grep -vE "^\{" "$OUT/bench_train_buckets.log" | tail -24
