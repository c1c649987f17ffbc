#!/usr/bin/env bash
# GPU session 4, last call (1 GPU): the offload tests on CUDA after the fix that fetches every input a
# checkpointed layer saved (transformers 5.17 on CUDA saves two per layer; the old test expected one), what
# those inputs are, then the rest of the GPU-marked tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PYTHONPATH=.:tests python - <<'PY' 2>&1 | tee "$OUT/offload_saved_inputs.txt"
import torch, transformers
from test_offload import _checkpointed
from tiny_models import batch
m = _checkpointed("llama", 0, True, "cuda", num_hidden_layers=2)
f = m.model.layers[0]._gradient_checkpointing_func
pack = f._pack
def spy(t):
    print("packed", type(t).__name__, tuple(t.shape), t.dtype, t.device)
    return pack(t)
f._pack = spy
ids, labels = batch(0, 1, 37)
m(input_ids=ids.cuda(), labels=labels.cuda()).loss.backward()
print("transformers", transformers.__version__, "torch", torch.__version__)
PY
timeout 120 python -m pytest -q -x tests/test_offload.py 2>&1 | tail -5 | tee "$OUT/gpu_offload_tests.log"
timeout 300 python -m pytest -q -m gpu tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
