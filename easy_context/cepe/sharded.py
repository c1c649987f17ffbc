"""Cross-attention over an encoder memory spread over a sequence-parallel group, exact.

CEPE's memory grows with the context, so each rank of a group encodes its own share of the chunks
(``chunk_range``) and keeps their keys and values. Every rank attends its decoder queries over its local memory,
giving a partial (out, lse) per query; the partials of all ranks merge with ``attention.merge.merge_`` in
float32, in rank order, which equals attention over the whole memory. The decoder queries are either the same on
every rank ("replicated": the partials are all-gathered, every rank merges them all) or each rank's own shard of
the decoder window ("sharded": the queries are all-gathered first, and each rank gets back, by all-to-all, every
rank's partial for its own queries).

Backward is exact the ring attention way: each memory block's gradients come from the kernel's backward given
the *final* merged out and lse, and add up. Gradient convention: a rank's key/value gradient is that of its own
memory over all queries of the group; its query gradient sums every rank's memory ("sharded": for its own queries;
"replicated": the full query gradient, the same on every rank, from the dout of its own, identical, loss).

Padding (mask False) is left out of the keys, row by row; a query with no key anywhere gets a zero output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.comm import rank_and_size
from ..attention.kernels import select_kernel
from ..attention.merge import merge_
from ..attention.precision import accumulation_dtype

Tensor = torch.Tensor
QUERY_MODES = ("replicated", "sharded")
NO_KEYS_LSE = float("-inf")  # the lse of a query with no key in a block (its out: 0)


def chunk_range(num_chunks: int, rank: int, world: int) -> range:
    """The chunks rank ``rank`` of ``world`` encodes: a contiguous share, the first ``num_chunks % world`` ranks
    one more."""
    base, extra = divmod(num_chunks, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def memory_rank_size(group) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) for None: the memory is all on this rank."""
    return (0, 1) if group is None else rank_and_size(group)


def _local(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kernel, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of q over this rank's keys that the mask keeps (lse ``NO_KEYS_LSE`` and out 0 where none)."""
    if mask is None and k.shape[2]:
        return kernel.forward(q, k, v, False, scale)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], NO_KEYS_LSE, dtype=accumulation_dtype(q.dtype), device=q.device)
    for b in range(q.shape[0]):
        keep = torch.arange(k.shape[2], device=k.device) if mask is None else mask[b].nonzero().squeeze(1)
        if keep.numel():
            out[b:b + 1], lse[b:b + 1] = kernel.forward(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep],
                                                        False, scale)
    return out, lse


def _local_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, lse: Tensor,
                    kernel, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq in float32, dk, dv) of this rank's memory block, given the final merged out and lse."""
    acc = accumulation_dtype(q.dtype)
    if mask is None and k.shape[2]:
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, False, scale)
        return dq.to(acc), dk, dv
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for b in range(q.shape[0]):
        keep = torch.arange(k.shape[2], device=k.device) if mask is None else mask[b].nonzero().squeeze(1)
        if not keep.numel():
            continue
        g = kernel.backward(dout[b:b + 1], q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep],
                            out[b:b + 1], lse[b:b + 1], False, scale)
        dq[b:b + 1] = g[0]
        dk[b:b + 1, :, keep] = g[1]
        dv[b:b + 1, :, keep] = g[2]
    return dq, dk, dv


def _gather_queries(x: Tensor, group, world: int) -> Tensor:
    """Every rank's [B, H, S, ...] concatenated along dim 2, in rank order."""
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


def _scatter_by_rank(x: Tensor, group, world: int) -> Tensor:
    """All-to-all of [B, H, world * S, ...] cut along dim 2: returns [world, B, H, S, ...], entry i what rank i
    computed for this rank's S queries."""
    send = torch.stack(x.chunk(world, dim=2)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """``merge_``, also for rows where a side has no key (lse -inf, where merge_ would give NaN): the other side's."""
    none_here, none_there = torch.isneginf(lse), torch.isneginf(block_lse)
    if not bool(none_here.any() or none_there.any()):
        merge_(out, lse, block_out, block_lse)
        return
    kept_out, kept_lse = out.clone(), lse.clone()
    merge_(out, lse, block_out, block_lse)
    out.copy_(torch.where(none_there[..., None], kept_out,
                          torch.where(none_here[..., None], block_out.to(out.dtype), out)))
    lse.copy_(torch.where(none_there, kept_lse, torch.where(none_here, block_lse.to(lse.dtype), lse)))


def _merged(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The float32 (float64) merge of partial (out, lse) pairs, in list order."""
    out = outs[0].to(accumulation_dtype(outs[0].dtype)).clone()
    lse = lses[0].clone()
    for o, s in zip(outs[1:], lses[1:]):
        _merge_into(out, lse, o, s)
    return out, lse


class _MemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, group, sharded, kernel, scale):
        _, world = memory_rank_size(group)
        kern = select_kernel(q, k, kernel)
        q_all = _gather_queries(q, group, world) if sharded and world > 1 else q
        out, lse = _local(q_all, k, v, mask, kern, scale)
        if world > 1 and sharded:
            out, lse = _merged(list(_scatter_by_rank(out, group, world)), list(_scatter_by_rank(lse, group, world)))
        elif world > 1:
            outs = [torch.empty_like(out, memory_format=torch.contiguous_format) for _ in range(world)]
            lses = [torch.empty_like(lse) for _ in range(world)]
            dist.all_gather(outs, out.contiguous(), group=group)
            dist.all_gather(lses, lse.contiguous(), group=group)
            out, lse = _merged(outs, lses)
        out = out.to(q.dtype)
        ctx.save_for_backward(q_all, k, v, mask, out, lse)
        ctx.args = (group, world, sharded, kern, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_all, k, v, mask, out, lse = ctx.saved_tensors
        group, world, sharded, kern, scale = ctx.args
        if world > 1 and sharded:
            dout, out, lse = (_gather_queries(t, group, world) for t in (dout, out, lse))
        dq, dk, dv = _local_backward(dout.contiguous(), q_all, k, v, mask, out, lse, kern, scale)
        if world > 1 and sharded:
            dq = _scatter_by_rank(dq, group, world).sum(0)
        elif world > 1:
            dist.all_reduce(dq, group=group)
        return dq.to(q_all.dtype), dk, dv, None, None, None, None, None


def memory_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, group=None,
                     queries: str = "replicated", kernel: str | None = None, scale: float | None = None) -> Tensor:
    """Non-causal attention of q [B, H, Sq, D] over the memory keys/values k, v [B, Hkv, M, D] (this rank's part
    when spread over ``group``; module doc), ``mask`` [B, M] True for real tokens (None: all); returns out like q.
    ``queries``: "replicated" (q the same on every rank) or "sharded" (each rank's own queries; Sq equal on all)."""
    if queries not in QUERY_MODES:
        raise ValueError(f"queries must be one of {QUERY_MODES}; got {queries!r}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"memory attention takes q [B, H, Sq, D] and k, v [B, Hkv, M, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of the memory's kv heads ({k.shape[1]})")
    if mask is not None and mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"memory mask {tuple(mask.shape)} must be [B, M] = {(k.shape[0], k.shape[2])}")
    mask = None if mask is None else mask.bool()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _MemoryAttention.apply(q, k, v, mask, group, queries == "sharded", kernel, scale)
