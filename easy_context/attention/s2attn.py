"""LongLoRA's shifted sparse attention (S²-Attn) for training, causal, on easy_context's kernels.

The sequence is cut into groups of G tokens (default a quarter of the sequence). The first half of the
heads attend causally within groups [0, G), [G, 2G), ...; the second half within groups shifted by G/2:
[0, G/2), [G/2, 3G/2), ..., [S - G/2, S). The first and last shifted groups are half-groups: there is no
wrap-around, unlike the roll in the LongLoRA paper's pseudocode, where the first tokens of the shifted
heads see the last ones (LongLoRA issues #15, #90). This is the partition of LongLoRA's flash-attn
varlen path. Meant for training only: evaluate with full attention (``register_s2attn`` in
``easy_context/hf/s2attn.py`` switches to it whenever the attention module is in eval mode).

Sequence parallel: over a ``contiguous`` layout where each rank's shard is a whole number of groups, the
unshifted heads are purely local, and the shifted group that straddles ranks r-1 and r is split: rank
r-1's queries in it see only its own last G/2 keys (a local half-group), rank r's first G/2 queries also
see those keys (a "halo" of G/2 k/v from rank r-1, merged by log-sum-exp; its dk/dv are sent back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import Exchange, empty_in_order, global_rank, in_order_of, p2p, rank_and_size
from .documents import Documents
from .kernels import AttentionKernel, repeat_kv
from .merge import merge_
from .precision import accumulation_dtype
from .ring import BlockwiseAttention, prepare_call

Tensor = torch.Tensor
NAME = "s2attn"
LAYOUT = "contiguous"  # shard inputs like the "ring" backend: prepare_seq_parallel_inputs("ring", ...)
DEFAULT_RATIO = 0.25
_HALO_TAG, _DHALO_TAG = 21, 22


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive causal groups of ``size`` tokens from ``start``, for q heads ``heads``."""

    heads: slice
    kv_heads: slice
    start: int
    count: int
    size: int


def resolve_group_size(seq_len: int, world: int = 1, group_size: int | None = None,
                       ratio: float = DEFAULT_RATIO) -> int:
    """The group size G for a full sequence of ``seq_len`` over ``world`` contiguous shards; ValueError if unusable."""
    if group_size is None:
        if not 0 < ratio <= 1:
            raise ValueError(f"S²-Attn group ratio must be in (0, 1]; got {ratio}")
        size = int(seq_len * ratio)  # LongLoRA: group_size = int(q_len * group_size_ratio)
        what = f"{ratio} x {seq_len} tokens"
    else:
        size, what = group_size, "group_size"
    if not isinstance(size, int) or size < 2 or size % 2:
        raise ValueError(f"S²-Attn needs an even group size >= 2 (half the heads shift by half a group); "
                         f"got {size} ({what})")
    if seq_len % size:
        raise ValueError(f"S²-Attn: the sequence length {seq_len} is not a multiple of the group size {size} "
                         f"({what}); pad or truncate the sequence to a multiple of {size}")
    local = seq_len // world
    if local % size:
        raise ValueError(f"S²-Attn over {world} sequence-parallel ranks: each rank's shard ({local} tokens) must "
                         f"be a whole number of groups of {size}; use fewer ranks, a smaller group or a longer "
                         "sequence")
    return size


def segments(heads: int, kv_heads: int, seq: int, size: int) -> list[Segment]:
    """The local causal groups: unshifted heads' groups, then the shifted heads' first half-group, middle
    groups and last half-group (every (head, row) of q and k/v is in exactly one segment)."""
    h, hk, half = heads // 2, kv_heads // 2, size // 2
    plain, shifted = (slice(0, h), slice(0, hk)), (slice(h, heads), slice(hk, kv_heads))
    segs = [Segment(*plain, 0, seq // size, size), Segment(*shifted, 0, 1, half)]
    if seq > size:
        segs.append(Segment(*shifted, half, seq // size - 1, size))
    segs.append(Segment(*shifted, seq - half, 1, half))
    return segs


def _group(x: Tensor, heads: slice, seg: Segment) -> Tensor:
    """x[:, heads, seg rows] [B, h, count*size, D] as [B*count, h, size, D]; a view when x is [B,S,H,D] in memory."""
    y = x[:, heads, seg.start: seg.start + seg.count * seg.size].transpose(1, 2)
    return y.reshape(x.shape[0] * seg.count, seg.size, y.shape[2], y.shape[3]).transpose(1, 2)


def _put(dst: Tensor, heads: slice, seg: Segment, src: Tensor) -> None:
    """Inverse of ``_group``: write [B*count, h, size, D] back into dst's rows of the segment."""
    b = dst.shape[0]
    flat = src.transpose(1, 2).reshape(b, seg.count * seg.size, src.shape[1], src.shape[3]).transpose(1, 2)
    dst[:, heads, seg.start: seg.start + seg.count * seg.size].copy_(flat)


def _neighbours(group, rank: int, world: int) -> tuple[int | None, int | None]:
    prev = global_rank(group, rank - 1) if rank > 0 else None
    nxt = global_rank(group, rank + 1) if rank + 1 < world else None
    return prev, nxt


def _exchange_halo(k: Tensor, v: Tensor, seg: Segment, group, rank: int, world: int) -> Exchange | None:
    """Send the shifted kv heads' last G/2 rows to the next rank, receive the previous rank's (collective)."""
    if world == 1:
        return None
    prev, nxt = _neighbours(group, rank, world)
    half = seg.size
    tail = [x[:, seg.kv_heads, -half:] for x in (k, v)]
    sends = [(t, nxt) for t in tail] if nxt is not None else []
    recvs = [(empty_in_order(t), prev) for t in tail] if prev is not None else []
    return p2p(sends, recvs, group, _HALO_TAG)


def s2_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, kernel: AttentionKernel, size: int,
               group) -> tuple[Tensor, Tensor]:
    """out [B,H,S,D] (stored [B,S,H,D]) and lse [B,H,S] of S²-Attn on this rank's contiguous shard."""
    rank, world = rank_and_size(group)
    b, h, s, d = q.shape
    segs = segments(h, k.shape[1], s, size)
    first = segs[1]  # the shifted heads' first half-group: on rank > 0 it continues rank-1's last one
    pending = _exchange_halo(k, v, first, group, rank, world)
    out = q.new_empty(b, s, h, d).transpose(1, 2)
    lse = torch.empty(b, h, s, 1, dtype=accumulation_dtype(q.dtype), device=q.device)
    for seg in segs:
        o, l = kernel.forward(_group(q, seg.heads, seg), _group(k, seg.kv_heads, seg), _group(v, seg.kv_heads, seg),
                              True, scale)
        _put(out, seg.heads, seg, o)
        _put(lse, seg.heads, seg, l.unsqueeze(-1))
    lse = lse.squeeze(-1)
    if pending is not None:
        halo = pending.wait()
        if rank > 0:  # every halo key precedes these queries: a non-causal block, merged in float32
            rows = (slice(None), first.heads, slice(0, first.size))
            o, l = kernel.forward(q[rows], *halo, False, scale)
            acc = out[rows].to(accumulation_dtype(q.dtype))
            merge_(acc, lse[rows], o, l)
            out[rows].copy_(acc)
    return out, lse


def s2_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                kernel: AttentionKernel, size: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the local shard given the final out/lse; the halo's dk/dv go back to the previous rank."""
    rank, world = rank_and_size(group)
    segs = segments(q.shape[1], k.shape[1], q.shape[2], size)
    first = segs[1]
    pending = _exchange_halo(k, v, first, group, rank, world)  # fetched again rather than kept alive
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse4 = lse.unsqueeze(-1)
    for seg in segs:
        g_dq, g_dk, g_dv = kernel.backward(
            _group(dout, seg.heads, seg), _group(q, seg.heads, seg), _group(k, seg.kv_heads, seg),
            _group(v, seg.kv_heads, seg), _group(out, seg.heads, seg), _group(lse4, seg.heads, seg).squeeze(-1),
            True, scale)
        _put(dq, seg.heads, seg, g_dq)
        _put(dk, seg.kv_heads, seg, g_dk)
        _put(dv, seg.kv_heads, seg, g_dv)
    if pending is None:
        return dq, dk, dv
    halo = pending.wait()
    prev, nxt = _neighbours(group, rank, world)
    tail = (slice(None), first.kv_heads, slice(k.shape[2] - first.size, k.shape[2]))
    acc = accumulation_dtype(k.dtype)
    sends = []
    if rank > 0:
        rows = (slice(None), first.heads, slice(0, first.size))
        h_dq, h_dk, h_dv = kernel.backward(dout[rows], q[rows], *halo, out[rows], lse[rows], False, scale)
        dq[rows] += h_dq
        # in the memory order the previous rank receives them in: that of its own dk/dv tail rows
        sends = [(in_order_of(g.to(acc), d[tail]), prev) for g, d in ((h_dk, dk), (h_dv, dv))]
    recvs = [(empty_in_order(d[tail], acc), nxt) for d in (dk, dv)] if nxt is not None else []
    d_halo = p2p(sends, recvs, group, _DHALO_TAG).wait()
    if nxt is not None:
        dk[tail] = (dk[tail].to(d_halo[0].dtype) + d_halo[0]).to(dk.dtype)
        dv[tail] = (dv[tail].to(d_halo[1].dtype) + d_halo[1]).to(dv.dtype)
    return dq, dk, dv


def s2_attention(q: Tensor, k: Tensor, v: Tensor, *, group_size: int | None = None, ratio: float = DEFAULT_RATIO,
                 causal: bool = True, scale: float | None = None, group: dist.ProcessGroup | None = None,
                 kernel: str | AttentionKernel | None = None, return_lse: bool = False, check: bool = True,
                 documents: Documents | None = None):
    """Causal S²-Attn (module doc) of q [B,H,S_local,D], k/v [B,H_kv,S_local,D], each rank's contiguous shard.

    The group size is ``group_size`` or ``int(ratio * full length)``; it must be even and divide every
    rank's shard. Returns out [B,H,S_local,D] (plus the float32 lse if ``return_lse``); differentiable.
    Packed ``documents`` are refused: the shifted groups would cross them.
    """
    _, world = rank_and_size(group)
    size = 0

    def s2_options() -> None:  # inside prepare_call: a rank failing alone raises on every rank, not in the halo
        nonlocal size
        if not causal:
            raise ValueError("s2_attention is LongLoRA's causal training attention; causal=False is not supported")
        if documents is not None:
            raise ValueError("s2_attention: packed documents are not implemented for S²-Attn (its shifted groups "
                             "would cross them); train packed batches with an exact backend, or one document per row")
        if q.shape[1] % 2:
            raise ValueError(f"S²-Attn shifts half of the heads, so the head count must be even; "
                             f"got {q.shape[1]}")
        size = resolve_group_size(q.shape[2] * world, world, group_size, ratio)

    scale, kern = prepare_call(q, k, v, causal, scale, group, kernel, check, "s2_attention", s2_options)
    heads, kv_heads = q.shape[1], k.shape[1]
    n_rep = heads // kv_heads
    if (heads // 2) % n_rep:  # an odd kv head count straddles the two halves: give each q head its own k/v
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out, lse = BlockwiseAttention.apply(q, k, v, s2_forward, s2_backward, scale, kern, size, group)
    return (out, lse) if return_lse else out
