"""Ring attention: K/V travel around the sequence-parallel group while each rank keeps its Q.

The ring engine here is shared by the plain ring (contiguous shards, this file) and the zigzag ring
(``zigzag.py``): an algorithm is only a *schedule*, which says for each step which rows of the local
Q meet which rows of the K/V block that arrived, and whether that block is causal.

Forward: at step s rank r holds the K/V of rank (r - s) mod P; the next K/V transfer is issued before
the current block is computed, and block results are merged in float32 (``merge.merge_``).
Backward: each block's dq/dk/dv is computed against the final (out, lse); dq stays local, and a float32
dk/dv accumulator travels with its K/V around the ring and arrives home after P hops.

Packed documents (``documents=``): every block is cut along the documents (``documents.block_pieces``) in the
global token order of the ``layout`` the schedule runs on: blocks whose documents do not meet are skipped, a
diagonal block that holds several documents is one varlen call, and the rest are unmasked rectangles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .comm import RingComm, check_same_across_ranks, memory_order, rank_and_size
from .documents import Bounds, Documents, Piece, backward_by_rows, block_pieces, forward_by_rows, rank_spans
from .head_groups import backward_by_head_groups, forward_by_head_groups
from .kernels import AttentionKernel, check_inputs, select_kernel
from .merge import RowSum, merge_
from .precision import accumulation_dtype
from .reuse import reuse_or_compute

Tensor = torch.Tensor
ALL = slice(None)
_KV_TAG, _DKV_TAG = 11, 12


@dataclass(frozen=True)
class Block:
    """One kernel call: local q rows ``q`` against rows ``k`` of the current K/V, causal or not."""

    q: slice
    k: slice
    causal: bool


Schedule = Callable[[int, int, int, int, bool], list[Block]]


def ring_schedule(step: int, rank: int, world: int, seq: int, causal: bool) -> list[Block]:
    """Plain ring over contiguous shards: causal ranks skip K/V from later ranks (unbalanced)."""
    if not causal:
        return [Block(ALL, ALL, False)]
    if step == 0:
        return [Block(ALL, ALL, True)]
    src = (rank - step) % world
    return [Block(ALL, ALL, False)] if src < rank else []


def pieces(blocks: list[Block], bounds: Bounds | None, layout: str, rank: int, src: int, world: int) -> list[Piece]:
    """The kernel calls of ``blocks`` (local q rows of ``rank`` against the K/V rows of ``src``): the blocks
    themselves without documents, else each cut along documents ``bounds`` in ``layout`` over ``world`` ranks."""
    if bounds is None:
        return [Piece(b.q, b.k, b.causal) for b in blocks]
    q_spans, k_spans = rank_spans(bounds[-1], layout, rank, world), rank_spans(bounds[-1], layout, src, world)
    return [p for b in blocks for p in block_pieces(bounds, q_spans, k_spans, b.q, b.k, b.causal)]


def whole_block(schedule: Schedule, world: int, seq: int, causal: bool, bounds: Bounds | None) -> Piece | None:
    """The single kernel call of a group of one rank without documents (None otherwise): no transfer to overlap
    and nothing to merge, so the kernel's own results are the ring's."""
    if world > 1 or bounds is not None:
        return None
    blocks = schedule(0, 0, 1, seq, causal)
    if len(blocks) != 1 or blocks[0].q != ALL or blocks[0].k != ALL:
        return None
    return Piece(ALL, ALL, blocks[0].causal)


def piece_forward(kernel: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, p: Piece,
                  scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of one piece: rows ``p.q`` of q against rows ``p.k`` of k/v, by documents when it has them."""
    args = (q[:, :, p.q], k[:, :, p.k], v[:, :, p.k])
    if p.cu_seqlens is None:
        return kernel.forward(*args, p.causal, scale)
    return kernel.forward_varlen(*args, p.cu_seqlens, p.causal, scale)


def piece_backward(kernel: AttentionKernel, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   p: Piece, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one piece, for its rows of q and of k/v."""
    args = (dout[:, :, p.q], q[:, :, p.q], k[:, :, p.k], v[:, :, p.k], out[:, :, p.q], lse[:, :, p.q])
    if p.cu_seqlens is None:
        return kernel.backward(*args, p.causal, scale)
    return kernel.backward_varlen(*args, p.cu_seqlens, p.causal, scale)


def by_rows_and_heads_forward(fn: Callable, q: Tensor, k: Tensor, v: Tensor, documents: Documents | None,
                              *args) -> tuple[Tensor, Tensor]:
    """``fn(q, k, v, bounds, *args)`` once per group of rows sharing documents (bounds None without documents),
    inside that once per group of heads (``head_groups``)."""
    if documents is None:
        return forward_by_head_groups(fn, q, k, v, None, *args)
    return forward_by_rows(lambda q_, k_, v_, bounds, *a: forward_by_head_groups(fn, q_, k_, v_, bounds, *a),
                           q, k, v, documents, *args)


def by_rows_and_heads_backward(fn: Callable, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               documents: Documents | None, *args) -> tuple[Tensor, Tensor, Tensor]:
    """The backward counterpart of ``by_rows_and_heads_forward``: ``fn(dout, q, k, v, out, lse, bounds, *args)``."""
    if documents is None:
        return backward_by_head_groups(fn, dout, q, k, v, out, lse, None, *args)
    return backward_by_rows(
        lambda do, q_, k_, v_, o, l_, bounds, *a: backward_by_head_groups(fn, do, q_, k_, v_, o, l_, bounds, *a),
        dout, q, k, v, out, lse, documents, *args)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, group, kernel: AttentionKernel,
                 schedule: Schedule, documents: Documents | None = None,
                 layout: str = "contiguous") -> tuple[Tensor, Tensor]:
    """Local out [B,H,S,D] (q dtype) and float32 lse [B,H,S] of attention over the whole ring.

    Heads are independent, so a long sequence runs the whole ring once per group of heads
    (``head_groups.head_chunks``): the float32 accumulators and the K/V in flight are then that group's only.
    With ``documents`` (of the whole sequence, split in ``layout``), rows with different documents run apart.
    """
    return by_rows_and_heads_forward(_ring_forward, q, k, v, documents, causal, scale, group, kernel, schedule,
                                     layout)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, bounds: Bounds | None, causal: bool, scale: float, group,
                  kernel: AttentionKernel, schedule: Schedule, layout: str) -> tuple[Tensor, Tensor]:
    rank, world = rank_and_size(group)
    whole = whole_block(schedule, world, q.shape[2], causal, bounds)
    if whole is not None:
        out, lse = piece_forward(kernel, q, k, v, whole, scale)
        return (out if out.stride() == q.stride() else torch.empty_like(q).copy_(out)), lse  # q's order: see below
    comm = RingComm(group) if world > 1 else None
    acc = accumulation_dtype(q.dtype)
    # Strided like q: HF hands q as a [B, S, H, D] buffer viewed [B, H, S, D], so the output comes back in
    # that memory order and the model's o_proj input is a view of it rather than a second copy.
    out = torch.empty_like(q, dtype=acc)
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    seq = q.shape[2]
    for step in range(world):
        pending = comm.start([k, v], tag=_KV_TAG) if step + 1 < world else None
        src = (rank - step) % world
        for p in pieces(schedule(step, rank, world, seq, causal), bounds, layout, rank, src, world):
            b_out, b_lse = piece_forward(kernel, q, k, v, p, scale)
            if step == 0 and p.q == p.k:  # step 0's diagonal pieces (listed first) cover every local row once
                out[:, :, p.q].copy_(b_out)
                lse[:, :, p.q].copy_(b_lse)
            else:
                merge_(out[:, :, p.q], lse[:, :, p.q], b_out, b_lse)
        if pending is not None:
            k, v = pending.wait()
    return out.to(q.dtype), lse


def split_local_blocks(blocks: list[Block], seq: int) -> tuple[list[Block], list[Block]]:
    """Split the local (step 0) work into a part run before the first K/V arrives and a part run last.

    A full causal diagonal block becomes its lower-left quadrant (no mask) first and the two causal
    diagonal quadrants last; a non-causal block splits by query rows. Gradients of blocks simply add.
    """
    if len(blocks) != 1 or blocks[0].q != ALL or blocks[0].k != ALL or seq % 2:
        return [], blocks
    h = seq // 2
    lo, hi = slice(0, h), slice(h, seq)
    if blocks[0].causal:
        return [Block(hi, lo, False)], [Block(lo, lo, True), Block(hi, hi, True)]
    return [Block(lo, ALL, False)], [Block(hi, ALL, False)]


def _backward_pieces(ps: list[Piece], dout, q, k, v, out, lse, scale, kernel, dq, dk, dv) -> None:
    """Add each piece's gradients into dq (local rows) and dk/dv (rows of the K/V held)."""
    for p in ps:
        b_dq, b_dk, b_dv = piece_backward(kernel, dout, q, k, v, out, lse, p, scale)
        dq.add(p.q, b_dq)
        dk.add(p.k, b_dk)
        dv.add(p.k, b_dv)


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                  scale: float, group, kernel: AttentionKernel, schedule: Schedule,
                  documents: Documents | None = None, layout: str = "contiguous") -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the local shards, given the final local out and lse (a ring per head group, as forward).

    The local block is split around the ring (``split_local_blocks``) so that both the first K/V hop
    and the last dk/dv hop overlap compute; a group of one rank makes one kernel call (``whole_block``). The
    float32 dk/dv accumulator of rank j's K/V starts at rank j+1 and reaches j after P-1 hops, where j adds its
    own local part.
    """
    return by_rows_and_heads_backward(_ring_backward, dout, q, k, v, out, lse, documents, causal, scale, group,
                                      kernel, schedule, layout)


def _ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bounds: Bounds | None,
                   causal: bool, scale: float, group, kernel: AttentionKernel, schedule: Schedule,
                   layout: str) -> tuple[Tensor, Tensor, Tensor]:
    rank, world = rank_and_size(group)
    seq = q.shape[2]
    whole = whole_block(schedule, world, seq, causal, bounds)
    if whole is not None:
        return piece_backward(kernel, dout, q, k, v, out, lse, whole, scale)
    acc = accumulation_dtype(q.dtype)
    dq, dk, dv = RowSum(q, acc), RowSum(k, acc), RowSum(v, acc)
    early, late = (pieces(part, bounds, layout, rank, rank, world)
                   for part in split_local_blocks(schedule(0, rank, world, seq, causal), seq))
    comm = RingComm(group) if world > 1 else None
    kv_pending = comm.start([k, v], tag=_KV_TAG) if world > 1 else None
    _backward_pieces(early, dout, q, k, v, out, lse, scale, kernel, dq, dk, dv)
    dkv_pending = None
    for step in range(1, world):
        k_cur, v_cur = kv_pending.wait()
        kv_pending = comm.start([k_cur, v_cur], tag=_KV_TAG) if step + 1 < world else None
        if step == 1:
            dk_acc, dv_acc = RowSum(k, acc), RowSum(v, acc)
        else:  # the accumulator that belongs to the K/V we hold now, from the previous rank
            dk_acc, dv_acc = map(RowSum.of, dkv_pending.wait())
        step_pieces = pieces(schedule(step, rank, world, seq, causal), bounds, layout, rank, (rank - step) % world,
                             world)
        _backward_pieces(step_pieces, dout, q, k_cur, v_cur, out, lse, scale, kernel, dq, dk_acc, dv_acc)
        dkv_pending = comm.start([dk_acc.result(), dv_acc.result()], tag=_DKV_TAG)
    _backward_pieces(late, dout, q, k, v, out, lse, scale, kernel, dq, dk, dv)
    if dkv_pending is None:
        return dq.result().to(q.dtype), dk.result().to(k.dtype), dv.result().to(v.dtype)
    dk_in, dv_in = dkv_pending.wait()  # the rest of our K/V's gradient: added and rounded in one pass
    return (dq.result().to(q.dtype), torch.add(dk.result(), dk_in, out=torch.empty_like(k)),
            torch.add(dv.result(), dv_in, out=torch.empty_like(v)))


class BlockwiseAttention(torch.autograd.Function):
    """Autograd for any exact sequence-parallel attention given as a forward and a backward function.

    ``apply(q, k, v, fwd, bwd, *args)``: ``fwd(q, k, v, *args) -> (out, lse)`` and
    ``bwd(dout, q, k, v, out, lse, *args) -> (dq, dk, dv)``; lse is returned but not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, *args):
        # replayed, not computed again, in an activation-checkpoint recompute (attention.reuse)
        out, lse = reuse_or_compute(lambda: fwd(q, k, v, *args))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.args = bwd, args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


def prepare_call(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, group,
                 kernel: str | AttentionKernel | None, check: bool, name: str,
                 validate: Callable[[], None] | None = None,
                 documents: Documents | None = None) -> tuple[float, AttentionKernel]:
    """Validate inputs (locally, plus the backend's ``validate()``, then across ranks when ``check``) and resolve
    scale and kernel. With ``check`` a ValueError on any rank is raised on every rank of ``group``, so that no
    rank waits alone in a collective that the failing rank never joins. ``documents`` must describe the whole
    sequence (local length x group size) and be the same on every rank."""
    error = kern = None
    try:
        check_inputs(q, k, v)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"{name}: causal attention needs equal local q and k lengths, got "
                             f"{q.shape[2]} and {k.shape[2]}")
        if documents is not None:
            if not isinstance(documents, Documents):
                raise ValueError(f"{name}: documents must be an attention.documents.Documents, not "
                                 f"{type(documents).__name__}")
            documents.check_batch(q.shape[0], q.shape[2] * rank_and_size(group)[1], name)
        if validate is not None:
            validate()
        kern = select_kernel(q, k, kernel)
    except ValueError as e:
        if not check:
            raise
        error = e
    if check:
        # memory orders too: K/V (and Q in dist-flash) travel in theirs, so the ranks' must agree
        meta = None  # not comparable unless 4-D (check_inputs then said why)
        if q.dim() == k.dim() == v.dim() == 4:
            docs = (0, 0) if not isinstance(documents, Documents) else (
                sum(len(b) - 1 for b in documents.bounds), hash(documents.bounds) % (1 << 62))
            meta = (list(q.shape) + list(k.shape) + [int(causal), q.element_size()]
                    + memory_order(q) + memory_order(k) + memory_order(v) + list(docs))
        names = ["B", "H", "S", "D", "B_kv", "H_kv", "S_kv", "D_kv", "causal", "dtype_bytes",
                 *(f"{t}_order{i}" for t in "qkv" for i in range(4)), "documents", "documents_hash"]
        check_same_across_ranks(meta, names, group, q.device, name, local_error=error)
    return (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])), kern


def run_ring(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, group,
             kernel: str | AttentionKernel | None, schedule: Schedule, return_lse: bool, check: bool,
             name: str, validate: Callable[[], None] | None = None, documents: Documents | None = None,
             layout: str = "contiguous"):
    """Shared entry of the ring-family backends (validation, then the autograd function)."""
    scale, kern = prepare_call(q, k, v, causal, scale, group, kernel, check, name, validate, documents)
    out, lse = BlockwiseAttention.apply(q, k, v, ring_forward, ring_backward, causal, scale, group, kern,
                                        schedule, documents, layout)
    return (out, lse) if return_lse else out


def ring_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                   group: dist.ProcessGroup | None = None, kernel: str | AttentionKernel | None = None,
                   return_lse: bool = False, check: bool = True, documents: Documents | None = None):
    """Exact attention over a sequence split in the ``contiguous`` layout across ``group``.

    q [B, H, S_local, D], k/v [B, H_kv, S_local, D] (H % H_kv == 0), each rank's contiguous shard.
    Returns out [B, H, S_local, D] in q's dtype, plus the float32 lse [B, H, S_local] if ``return_lse``.
    ``check`` runs a tiny collective that turns mismatched shapes across ranks into a ValueError.
    ``documents``: packed documents of the whole sequence (``documents.Documents``, the same on every rank); each
    token then attends within its own document only.
    """
    return run_ring(q, k, v, causal, scale, group, kernel, ring_schedule, return_lse, check, "ring_attention",
                    documents=documents)
