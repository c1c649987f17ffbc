"""The Accelerator a training job runs under: bf16 autocast on a GPU, a process-group timeout for long steps."""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs

STEP_TIMEOUT = timedelta(hours=6)  # a rank may wait this long in a collective (a 1M-token step takes ~25 min)


def training_accelerator(grad_accum: int, mixed_precision: str | None = None, cpu: bool = False) -> Accelerator:
    """An Accelerator stepping every ``grad_accum`` micro-steps, in ``mixed_precision`` (default: bf16 on a GPU,
    "no" on CPU). Autocast's cache of weight casts is off: it would keep every layer's bf16 weights until the
    forward ends, though checkpointed layers cast them again when recomputed."""
    if mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    return Accelerator(gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                       mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=STEP_TIMEOUT),
                                        AutocastKwargs(cache_enabled=False)])
