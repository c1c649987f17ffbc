#!/usr/bin/env bash
# GPU session 1 (2x H200): install the carried wheels, GPU tests, memory-option check, train.py throughput
# of the Llama-2-7B shape under ZeRO-3 offload (issues 5, 8, 9). Run from the repo root with .whl carried.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic 2>&1 | tail -2
python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2
date
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
date
timeout 100 python benchmarks/check_memory_options_gpu.py 2>&1 | tail -14 | tee "$OUT/check_memory_options_gpu.log"
date
timeout 380 python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 65536,131072 \
  --backends zigzag_ring --configs zero3_offload --steps 3 --warmup 1 --timeout 240 \
  --json "$OUT/bench_train_zigzag_offload.json" 2>&1 | tail -12 | tee "$OUT/bench_train_zigzag_offload.log"
date
