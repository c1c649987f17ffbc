"""Long blocks run as several calls, one per group of kv heads: heads are independent, so each call is exact.

A kernel call (and a whole ring, see ``ring.ring_forward``) over a block of more than ``MAX_CALL_ELEMENTS`` q
elements runs once per ``head_chunks`` group instead, the results written into q/k/v-shaped outputs. The
float32 accumulators, the k/v heads repeated for GQA and the kernel's workspace then hold one group's heads.
"""

from __future__ import annotations

from typing import Callable

import torch

from .precision import accumulation_dtype

Tensor = torch.Tensor

# Largest q block (elements) one kernel call gets: longer blocks run as several calls over groups of heads.
# At 1M tokens over 2 GPUs a call's q holds 2^31 elements; split, the k/v heads repeated for GQA, the kernel's
# float32 dq workspace and the call's outputs stay a fraction of the layer's activations. Every call at the
# 128K-over-2-GPUs scale of a 7B model (2^28) still runs whole.
MAX_CALL_ELEMENTS = 2 ** 28


def head_chunks(q: Tensor, k: Tensor, max_elements: int | None = None) -> list[tuple[slice, slice]]:
    """(q heads, kv heads) slices of whole kv-head groups whose q part holds at most ``max_elements``
    (default ``MAX_CALL_ELEMENTS``) elements, or one group when a single group is larger."""
    limit = MAX_CALL_ELEMENTS if max_elements is None else max_elements
    h, h_kv = q.shape[1], k.shape[1]
    n_rep = h // h_kv
    per_kv_head = q.numel() // h_kv
    step = max(1, min(h_kv, limit // max(per_kv_head, 1)))
    return [(slice(g * n_rep, min(g + step, h_kv) * n_rep), slice(g, min(g + step, h_kv)))
            for g in range(0, h_kv, step)]


def forward_by_head_groups(fn: Callable, q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    """``fn(q, k, v, *args) -> (out, lse)`` run once per ``head_chunks`` group, the results assembled
    (out like q, lse float32 or float64 [B, H, S]); a single call when one group holds everything."""
    chunks = head_chunks(q, k)
    if len(chunks) == 1:
        return fn(q, k, v, *args)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype), device=q.device)
    for hq, hk in chunks:
        out[:, hq], lse[:, hq] = fn(q[:, hq], k[:, hk], v[:, hk], *args)
    return out, lse


def backward_by_head_groups(fn: Callable, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """``fn(dout, q, k, v, out, lse, *args) -> (dq, dk, dv)`` run once per ``head_chunks`` group, the
    gradients assembled like q, k, v; a single call when one group holds everything."""
    chunks = head_chunks(q, k)
    if len(chunks) == 1:
        return fn(dout, q, k, v, out, lse, *args)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for hq, hk in chunks:
        dq[:, hq], dk[:, hk], dv[:, hk] = fn(dout[:, hq], q[:, hq], k[:, hk], v[:, hk], out[:, hq], lse[:, hq],
                                             *args)
    return dq, dk, dv
