"""Functions compiled by torch.compile into fused kernels, each once, on first use (importing this module does not
load the compiler)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def compiled(fn):
    """``fn`` compiled by torch.compile (full graph), built the first time it is asked for."""
    return torch.compile(fn, fullgraph=True)
