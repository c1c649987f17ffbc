"""Ulysses (DeepSpeed) attention: all-to-all from sequence shards to head shards and back.

Each of P ranks holds a contiguous 1/P of the sequence for all H heads. One ``all_to_all_single``
gives every rank the whole sequence (in rank order) for H/P heads, local attention runs there in one
kernel call, and the inverse all-to-all returns out (and lse) to the sequence-sharded layout. Backward
is the same sandwich around ``kernel.backward``: the all-to-all is its own transpose.

GQA: the kv heads are split like the q heads when P divides them. Otherwise each kv head is repeated
``P / gcd(P, H_kv)`` times first (its gradient is summed back), which always lines up with the q
heads because H is a multiple of both H_kv and P. So the only requirement is P | H.

``AllToAllAttention`` is the sandwich with any sequence-complete inner attention; USP reuses it
with a zigzag ring as the inner attention. Packed documents need nothing of the all-to-all: the inner call holds
the whole sequence, so it is one varlen kernel call (``kernel.forward_varlen``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from .comm import rank_and_size
from .documents import Documents, backward_by_rows, forward_by_rows
from .kernels import AttentionKernel, repeat_kv, sum_kv_groups
from .reuse import reuse_or_compute
from .ring import prepare_call

Tensor = torch.Tensor


def head_split_error(heads: int, world: int, what: str, name: str) -> ValueError | None:
    """The ValueError for ``heads`` q heads over a ``world``-rank all-to-all, None when they split evenly."""
    if heads % world == 0:
        return None
    sizes = [p for p in range(1, heads + 1) if heads % p == 0]
    return ValueError(f"{name}: {heads} q heads cannot be split evenly over a {what} of {world} ranks; "
                      f"sizes that work: {sizes} (divisors of the q head count)")


def kv_replication(q_heads: int, kv_heads: int, world: int) -> int:
    """How many times to repeat each kv head so that the kv heads split over ``world`` like the q heads."""
    return world // math.gcd(world, kv_heads) if q_heads % world == 0 else 1


def seq_to_heads(x: Tensor, group, world: int) -> Tensor:
    """All-to-all [B, H, S/P, D] (sequence shard) -> [B, H/P, S, D] (head shard, whole sequence in rank order)."""
    if world == 1:
        return x
    b, h, s, d = x.shape
    send = x.reshape(b, world, h // world, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's sequence shard of my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def heads_to_seq(x: Tensor, group, world: int) -> Tensor:
    """Inverse of ``seq_to_heads``: [B, H/P, S, D] -> [B, H, S/P, D]."""
    if world == 1:
        return x
    b, h, s, d = x.shape
    send = x.reshape(b, h, world, s // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: my sequence shard of rank i's heads
    return recv.transpose(0, 1).reshape(b, world * h, s // world, d)


class InnerAttention(Protocol):
    """Exact attention on head-sharded, sequence-complete q/k/v (for this rank's part of the group)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 lse: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


@dataclass(frozen=True)
class LocalAttention:
    """One kernel call over the whole gathered sequence (Ulysses' inner attention), within ``documents``."""

    kernel: AttentionKernel
    causal: bool
    scale: float
    documents: Documents | None = None

    def forward(self, q, k, v):
        if self.documents is None:
            return self.kernel.forward(q, k, v, self.causal, self.scale)
        return forward_by_rows(self._forward, q, k, v, self.documents)

    def backward(self, dout, q, k, v, out, lse):
        if self.documents is None:
            return self.kernel.backward(dout, q, k, v, out, lse, self.causal, self.scale)
        return backward_by_rows(self._backward, dout, q, k, v, out, lse, self.documents)

    def _forward(self, q, k, v, bounds):
        if len(bounds) == 2:  # one document: the plain call
            return self.kernel.forward(q, k, v, self.causal, self.scale)
        return self.kernel.forward_varlen(q, k, v, bounds, self.causal, self.scale)

    def _backward(self, dout, q, k, v, out, lse, bounds):
        if len(bounds) == 2:
            return self.kernel.backward(dout, q, k, v, out, lse, self.causal, self.scale)
        return self.kernel.backward_varlen(dout, q, k, v, out, lse, bounds, self.causal, self.scale)


class AllToAllAttention(torch.autograd.Function):
    """(q, k, v, group, inner) -> (out, lse), sequence-sharded in and out, ``inner`` run head-sharded."""

    @staticmethod
    def forward(ctx, q, k, v, group, inner):
        _, world = rank_and_size(group)
        n_rep = kv_replication(q.shape[1], k.shape[1], world)
        hq = seq_to_heads(q, group, world)
        hk = seq_to_heads(repeat_kv(k, n_rep), group, world)
        hv = seq_to_heads(repeat_kv(v, n_rep), group, world)
        # replayed, not computed again, in an activation-checkpoint recompute (attention.reuse)
        h_out, h_lse = reuse_or_compute(lambda: inner.forward(hq, hk, hv))
        ctx.save_for_backward(hq, hk, hv, h_out, h_lse)
        ctx.args = (group, world, inner, k.shape[1])
        out = heads_to_seq(h_out, group, world)
        lse = heads_to_seq(h_lse.unsqueeze(-1), group, world).squeeze(-1)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        group, world, inner, kv_heads = ctx.args
        hq, hk, hv, h_out, h_lse = ctx.saved_tensors
        dq, dk, dv = inner.backward(seq_to_heads(dout, group, world), hq, hk, hv, h_out, h_lse)
        dq = heads_to_seq(dq, group, world)
        dk = sum_kv_groups(heads_to_seq(dk, group, world), kv_heads)
        dv = sum_kv_groups(heads_to_seq(dv, group, world), kv_heads)
        return dq, dk, dv, None, None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                      group: dist.ProcessGroup | None = None, kernel: str | AttentionKernel | None = None,
                      return_lse: bool = False, check: bool = True, documents: Documents | None = None):
    """Exact attention over a sequence split in the ``contiguous`` layout across ``group``, by all-to-all.

    q [B, H, S_local, D], k/v [B, H_kv, S_local, D] with H divisible by the group size P. Returns out
    [B, H, S_local, D] (q dtype), plus the float32 lse [B, H, S_local] if ``return_lse``, sequence-sharded.
    ``documents``: packed documents of the whole sequence, as in ``ring.ring_attention``.
    """
    name = "ulysses_attention"
    _, world = rank_and_size(group)

    def heads_split() -> None:
        err = head_split_error(q.shape[1], world, "sequence-parallel group", name)
        if err:
            raise err

    scale, kern = prepare_call(q, k, v, causal, scale, group, kernel, check, name, heads_split, documents)
    out, lse = AllToAllAttention.apply(q, k, v, group, LocalAttention(kern, causal, scale, documents))
    return (out, lse) if return_lse else out
