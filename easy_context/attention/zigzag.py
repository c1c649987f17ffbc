"""Zigzag ring attention: the ring engine with a causal schedule balanced by the ``zigzag`` layout.

Rank r holds chunks r and 2P-1-r of 2P. When the K/V of rank j arrives:
* j == r: the local causal block;
* j < r: all local queries see the first chunk of j's K/V (chunk j), none of the second;
* j > r: only the second local chunk of queries (2P-1-r) sees j's K/V, all of it.
So every rank computes exactly one half-sized block per step after the first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .documents import Documents
from .kernels import AttentionKernel
from .ring import ALL, Block, run_ring

Tensor = torch.Tensor


def zigzag_schedule(step: int, rank: int, world: int, seq: int, causal: bool) -> list[Block]:
    """Which rows meet at ``step`` in the zigzag layout (local length ``seq`` = two chunks)."""
    if not causal:
        return [Block(ALL, ALL, False)]
    if step == 0:
        return [Block(ALL, ALL, True)]
    half = seq // 2
    src = (rank - step) % world
    if src < rank:
        return [Block(ALL, slice(0, half), False)]
    return [Block(slice(half, seq), ALL, False)]


def zigzag_ring_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                          group: dist.ProcessGroup | None = None, kernel: str | AttentionKernel | None = None,
                          return_lse: bool = False, check: bool = True, documents: Documents | None = None):
    """Exact attention over a sequence split in the ``zigzag`` layout across ``group``.

    Same contract as ``ring.ring_attention`` (``documents`` too); the local length must be even (two equal chunks).
    """
    def even_length() -> None:
        if q.shape[2] % 2:
            raise ValueError(f"zigzag_ring_attention: each rank holds two equal chunks, so the local length "
                             f"must be even; got {q.shape[2]} (shard with layouts.shard(..., 'zigzag', ...))")

    return run_ring(q, k, v, causal, scale, group, kernel, zigzag_schedule, return_lse, check,
                    "zigzag_ring_attention", even_length, documents, "zigzag")
