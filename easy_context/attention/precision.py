"""The dtype attention and loss accumulate in: float64 for float64 inputs (the exact tests), float32 otherwise."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for any other (bf16, fp16, fp32): the dtype of running sums and lse."""
    return torch.float64 if dtype == torch.float64 else torch.float32
