"""DistFlashAttn (LightSeq) attention: a load-balanced causal schedule on the ``contiguous`` layout.

With contiguous shards, causal rank r needs the K/V of ranks 0..r, so a plain ring leaves early
ranks idle. Here the block of queries of rank i against keys/values of rank j < i (distance
d = i - j) is computed at step ``min(d, P - d)``:

* d <= P/2: by the owner i, with j's K/V sent to it ("kv" step);
* d > P/2: by the helper j, with i's Q sent to it ("q" step); the helper returns the partial
  (out, lse) one step later and the owner merges it (``merge_``).

Every rank computes at most one block per step and the whole attention takes P//2 + 1 steps
instead of P. For P = 4 (``qi.kvj``: rank i's queries against rank j's keys/values):

====  ================  ================  ================  ================
step  rank 0            rank 1            rank 2            rank 3
====  ================  ================  ================  ================
0     q0.kv0 (causal)   q1.kv1 (causal)   q2.kv2 (causal)   q3.kv3 (causal)
1     q3.kv0 (helps 3)  q1.kv0            q2.kv1            q3.kv2
2     idle              idle              q2.kv0            q3.kv1
====  ================  ================  ================  ================

At step t >= 1 rank r sends to rank r+t (mod P) its K/V or its Q, and receives from rank r-t. The
transfers of step t+1 and the returned results of step t-1 are issued before step t is computed.

Backward runs the same table with the final (out, lse) of the forward: a "kv" step computes the
owner's dq locally and returns dk/dv to the K/V's rank; a "q" step receives the owner's
(q, dout, out, lse), keeps dk/dv for its own K/V and returns dq. Non-causal attention has no
imbalance and uses the plain ring schedule.

Packed documents (``documents=``): each block is cut along the documents (``documents.block_pieces``); a block
whose documents do not meet computes nothing, and a helper returns lse -inf (and zeros) for the rows it did not
compute, which the owner's merge leaves as they were.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .comm import empty_in_order, global_rank, in_order_of, p2p, rank_and_size
from .documents import Bounds, Documents
from .kernels import AttentionKernel
from .merge import RowSum, merge_
from .precision import accumulation_dtype
from .ring import (ALL, Block, BlockwiseAttention, by_rows_and_heads_backward, by_rows_and_heads_forward, pieces,
                   piece_backward, piece_forward, prepare_call, ring_schedule, run_ring)

Tensor = torch.Tensor
_TAG = 13


def num_steps(world: int) -> int:
    """Steps of the balanced causal schedule over ``world`` ranks (step 0 is the local diagonal block)."""
    return world // 2 + 1


def step_role(step: int, rank: int, world: int) -> str | None:
    """What ``rank`` gets from rank (rank - step) mod P at ``step`` >= 1: its K/V ("kv"), its Q ("q") or nothing."""
    if rank >= step:
        return "kv"
    if 2 * step < world:
        return "q"
    return None


def schedule_table(world: int) -> list[list[tuple[int, int] | None]]:
    """[step][rank] -> (query rank, key/value rank) of the block that rank computes, or None when idle."""
    table = [[(r, r) for r in range(world)]]
    for t in range(1, num_steps(world)):
        row = []
        for r in range(world):
            role = step_role(t, r, world)
            row.append((r, r - t) if role == "kv" else (r - t + world, r) if role == "q" else None)
        table.append(row)
    return table


Tensors = list[Tensor]


def _run_steps(rank: int, world: int, group, payload: dict[str, Tensors], result_like: dict[str, Tensors],
               local: Callable[[], None], compute: Callable[[str, Tensors, int], Tensors],
               absorb: Callable[[str, Tensors], None]) -> None:
    """Drive the schedule: ``local()`` at step 0; at step t every rank sends ``payload[kind]`` to rank + t,
    runs ``compute(kind, received, rank - t)`` on what rank - t sent and returns those results to it during
    step t + 1, where the sender hands them to ``absorb(kind, results)``."""
    steps = num_steps(world)
    inbox: tuple[str, Tensors] | None = None
    outbox: list[tuple[Tensor, int]] = []
    for t in range(steps + 1):  # the extra round only returns the last step's results
        sends, recvs = [], []
        in_kind = back_kind = None
        if t + 1 < steps:
            dst, src = (rank + t + 1) % world, (rank - t - 1) % world
            out_kind, in_kind = step_role(t + 1, dst, world), step_role(t + 1, rank, world)
            if out_kind:
                sends += [(x, global_rank(group, dst)) for x in payload[out_kind]]
            if in_kind:
                recvs += [(empty_in_order(x), global_rank(group, src)) for x in payload[in_kind]]
        n_in = len(recvs)
        sends += outbox
        if t >= 2:  # results of what this rank sent for step t - 1
            dst = (rank + t - 1) % world
            back_kind = step_role(t - 1, dst, world)
            if back_kind:
                recvs += [(empty_in_order(x), global_rank(group, dst)) for x in result_like[back_kind]]
        pending = p2p(sends, recvs, group, tag=_TAG)
        outbox = []
        if t == 0:
            local()
        elif inbox is not None:
            peer = global_rank(group, (rank - t) % world)
            # a kernel picks its outputs' layout; they travel in the layout the peer receives them in
            results = compute(*inbox, (rank - t) % world)
            outbox = [(in_order_of(x, like), peer) for x, like in zip(results, result_like[inbox[0]])]
        received = pending.wait()
        inbox = (in_kind, received[:n_in]) if in_kind else None
        if back_kind and result_like[back_kind]:
            absorb(back_kind, received[n_in:])


def _block(bounds: Bounds | None, q_rank: int, kv_rank: int, world: int):
    """The pieces of rank ``q_rank``'s queries against rank ``kv_rank``'s keys (whole contiguous chunks)."""
    blk = Block(ALL, ALL, q_rank == kv_rank)
    return pieces([blk], bounds, "contiguous", q_rank, kv_rank, world)


def dist_flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, group, kernel: AttentionKernel,
                       documents: Documents | None = None) -> tuple[Tensor, Tensor]:
    """Causal local out [B,H,S,D] (q dtype) and float32 lse [B,H,S] with the balanced schedule (within
    ``documents`` of the whole sequence, when given)."""
    return by_rows_and_heads_forward(_dist_flash_forward, q, k, v, documents, scale, group, kernel)


def _dist_flash_forward(q: Tensor, k: Tensor, v: Tensor, bounds: Bounds | None, scale: float, group,
                        kernel: AttentionKernel) -> tuple[Tensor, Tensor]:
    rank, world = rank_and_size(group)
    acc = accumulation_dtype(q.dtype)
    out = torch.empty_like(q, dtype=acc)  # q's memory order, which cuDNN's backward then takes as is
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)

    def local():
        for p in _block(bounds, rank, rank, world):  # diagonal pieces: they cover every row once
            b_out, b_lse = piece_forward(kernel, q, k, v, p, scale)
            out[:, :, p.q].copy_(b_out)
            lse[:, :, p.q].copy_(b_lse)

    def compute(kind, got, src):
        if kind == "kv":
            for p in _block(bounds, rank, src, world):
                merge_(out[:, :, p.q], lse[:, :, p.q], *piece_forward(kernel, q, got[0], got[1], p, scale))
            return []
        o_q = got[0]
        ps = _block(bounds, src, rank, world)
        if bounds is None:
            b_out, b_lse = piece_forward(kernel, o_q, k, v, ps[0], scale)
            return [b_out, b_lse.to(acc)]
        h_out = torch.zeros_like(o_q)  # rows no document reaches: lse -inf, nothing to merge
        h_lse = torch.full(o_q.shape[:3], float("-inf"), dtype=acc, device=o_q.device)
        for p in ps:
            b_out, b_lse = piece_forward(kernel, o_q, k, v, p, scale)
            h_out[:, :, p.q].copy_(b_out)
            h_lse[:, :, p.q].copy_(b_lse)
        return [h_out, h_lse]

    def absorb(kind, got):
        merge_(out, lse, got[0], got[1])

    _run_steps(rank, world, group, payload={"kv": [k, v], "q": [q]}, result_like={"kv": [], "q": [q, lse]},
               local=local, compute=compute, absorb=absorb)
    return out.to(q.dtype), lse


def dist_flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                        group, kernel: AttentionKernel,
                        documents: Documents | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the local shards for causal attention, given the final local out and lse."""
    return by_rows_and_heads_backward(_dist_flash_backward, dout, q, k, v, out, lse, documents, scale, group, kernel)


def _dist_flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         bounds: Bounds | None, scale: float, group,
                         kernel: AttentionKernel) -> tuple[Tensor, Tensor, Tensor]:
    rank, world = rank_and_size(group)
    acc = accumulation_dtype(q.dtype)
    dq, dk, dv = (RowSum(t, acc) for t in (q, k, v))

    def add(p, grads, targets) -> None:
        for acc_t, rows, g in zip(targets, (p.q, p.k, p.k), grads):
            acc_t.add(rows, g)

    def local():
        for p in _block(bounds, rank, rank, world):
            add(p, piece_backward(kernel, dout, q, k, v, out, lse, p, scale), (dq, dk, dv))

    def compute(kind, got, src):
        if kind == "kv":  # own queries, their K/V: keep dq, return dk/dv
            ps = _block(bounds, rank, src, world)
            if bounds is None:
                b_dq, b_dk, b_dv = piece_backward(kernel, dout, q, got[0], got[1], out, lse, ps[0], scale)
                dq.add(ALL, b_dq)
                return [b_dk, b_dv]
            b_dk, b_dv = RowSum(got[0], acc), RowSum(got[1], acc)
            for p in ps:
                add(p, piece_backward(kernel, dout, q, got[0], got[1], out, lse, p, scale), (dq, b_dk, b_dv))
            return [b_dk.result().to(k.dtype), b_dv.result().to(v.dtype)]
        o_q, o_dout, o_out, o_lse = got  # their queries, own K/V: keep dk/dv, return dq
        ps = _block(bounds, src, rank, world)
        if bounds is None:
            b_dq, b_dk, b_dv = piece_backward(kernel, o_dout, o_q, k, v, o_out, o_lse, ps[0], scale)
            dk.add(ALL, b_dk)
            dv.add(ALL, b_dv)
            return [b_dq]
        b_dq = RowSum(o_q, acc)
        for p in ps:
            add(p, piece_backward(kernel, o_dout, o_q, k, v, o_out, o_lse, p, scale), (b_dq, dk, dv))
        return [b_dq.result().to(q.dtype)]

    def absorb(kind, got):
        for acc_t, g in zip((dk, dv) if kind == "kv" else (dq,), got):
            acc_t.add(ALL, g)

    _run_steps(rank, world, group, payload={"kv": [k, v], "q": [q, dout, out, lse]},
               result_like={"kv": [k, v], "q": [q]}, local=local, compute=compute, absorb=absorb)
    return dq.result().to(q.dtype), dk.result().to(k.dtype), dv.result().to(v.dtype)


def dist_flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                         group: dist.ProcessGroup | None = None, kernel: str | AttentionKernel | None = None,
                         return_lse: bool = False, check: bool = True, documents: Documents | None = None):
    """Exact attention over a sequence split in the ``contiguous`` layout across ``group``, load-balanced.

    Same contract as ``ring.ring_attention`` (q [B, H, S_local, D], k/v [B, H_kv, S_local, D]; returns
    out, plus the float32 lse [B, H, S_local] if ``return_lse``; ``documents`` too); causal runs in P//2 + 1 steps.
    """
    name = "dist_flash_attention"
    if not causal:
        return run_ring(q, k, v, causal, scale, group, kernel, ring_schedule, return_lse, check, name,
                        documents=documents)
    scale, kern = prepare_call(q, k, v, causal, scale, group, kernel, check, name, documents=documents)
    out, lse = BlockwiseAttention.apply(q, k, v, dist_flash_forward, dist_flash_backward, scale, group, kern,
                                        documents)
    return (out, lse) if return_lse else out
