"""Process-group plumbing shared by the backends: ring point-to-point exchange and cross-rank checks."""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup


def rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """(rank within group, group size); (0, 1) when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (None = WORLD)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


class Exchange:
    """Tensors in flight: ``wait()`` returns the received ones once the transfer completes.

    It also holds the buffers being sent until then: a send buffer that only the op referenced (a
    packed copy, or a result the caller dropped) could otherwise go back to the allocator and be
    overwritten by the compute stream while the communication stream still reads it.
    """

    def __init__(self, reqs: list, received: list[Tensor], sending: list[Tensor] | None = None):
        self._reqs, self._received, self._sending = reqs, received, sending or []

    def wait(self) -> list[Tensor]:
        for r in self._reqs:
            r.wait()  # on CUDA: the current stream waits for the transfer, so the buffers may be freed after
        self._reqs, self._sending = [], []
        return self._received


def memory_order(t: Tensor) -> list[int]:
    """``t``'s dims from outermost to innermost in memory (by stride, ties by position); a [B, H, S, D] view of a
    [B, S, H, D] buffer gives [0, 2, 1, 3]. Broadcast (stride-0) dims count as outermost, so that the innermost
    dim of an expanded tensor stays innermost in a copy laid out in this order."""
    return sorted(range(t.dim()), key=lambda d: (t.stride(d) != 0, -t.stride(d), d))


def empty_in_order(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new dense tensor shaped like ``t`` with ``t``'s memory order (``memory_order``): a receive buffer
    for what the peer sends of a tensor like ``t``."""
    order = memory_order(t)
    buf = torch.empty([t.shape[d] for d in order], dtype=dtype or t.dtype, device=t.device)
    return buf.permute([order.index(d) for d in range(t.dim())])


def in_order_of(x: Tensor, like: Tensor) -> Tensor:
    """``x`` (shaped like ``like``) laid out in ``like``'s memory order: itself when it already is, else a copy.
    For sending a computed result (a kernel picks its own output layout) to a peer that receives it into
    ``empty_in_order`` of its own ``like``."""
    if memory_order(x) == memory_order(like):
        return x
    return empty_in_order(like, x.dtype).copy_(x)


def packed(t: Tensor) -> Tensor:
    """``t`` permuted into its memory order and contiguous: a view of ``t`` when it is dense (no copy, so a
    [B, S, H, D] buffer viewed as [B, H, S, D] travels as is), else a copy in that order."""
    return t.permute(memory_order(t)).contiguous()


class RingComm:
    """Rotates tensors around a group: each rank sends to rank+1 and receives from rank-1."""

    def __init__(self, group: ProcessGroup | None = None, offset: int = 1):
        self.group = group
        self.rank, self.world = rank_and_size(group)
        self.send_peer = global_rank(group, (self.rank + offset) % self.world)
        self.recv_peer = global_rank(group, (self.rank - offset) % self.world)

    def start(self, tensors: list[Tensor], tag: int = 0) -> Exchange:
        """Begin sending ``tensors`` forward and receiving same-shaped ones, in the same memory order, from
        behind."""
        received = [empty_in_order(t) for t in tensors]
        return p2p(
            sends=[(t, self.send_peer) for t in tensors],
            recvs=[(r, self.recv_peer) for r in received],
            group=self.group, tag=tag)


def p2p(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], group: ProcessGroup | None,
        tag: int = 0) -> Exchange:
    """Issue isend/irecv pairs (global peer ranks) as one batch; returns the pending exchange.

    Tensors travel in their memory order (``packed``): a receive buffer gets its sender's values only
    when it has the sent tensor's memory order, as ``empty_in_order`` of a same-strided tensor gives;
    a buffer that is not dense (a slice) cannot receive in place and raises ValueError.
    """
    receiving = [r.permute(memory_order(r)) for r, _ in recvs]
    for (r, _), view in zip(recvs, receiving):
        if not view.is_contiguous():
            raise ValueError(f"p2p: a receive buffer of shape {tuple(r.shape)} and strides {r.stride()} is not "
                             "dense, so it cannot be received into in place; allocate it with "
                             "comm.empty_in_order(like)")
    sending = [packed(t) for t, _ in sends]
    ops = [dist.P2POp(dist.isend, t, peer, group, tag) for t, (_, peer) in zip(sending, sends)]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for t, (_, peer) in zip(receiving, recvs)]
    if not ops:
        return Exchange([], [])
    reqs = dist.batch_isend_irecv(ops)
    return Exchange(reqs, [r for r, _ in recvs], sending)


def check_same_across_ranks(values: list[int] | None, names: list[str], group: ProcessGroup | None,
                            device: torch.device, what: str, local_error: ValueError | None = None) -> None:
    """Collective: raise a ValueError on every rank unless all ranks passed equal ``values`` and no local_error.

    ``local_error`` is this rank's own validation error, raised here on every rank of the group (one rank's
    local raise would leave the others waiting in their next collective until the timeout); ``values`` (equal
    length on every rank) may then be None. Costs one tiny all-gather when all is well.
    """
    _, world = rank_and_size(group)
    if world == 1:
        if local_error is not None:
            raise local_error
        return
    text = b"" if local_error is None else str(local_error).removeprefix(f"{what}: ").encode()
    header = [int(local_error is not None), len(text), int(values is not None)]
    rows = _all_gather_ints(header + (list(values) if values is not None else [0] * len(names)), group, device)
    failed = [i for i, r in enumerate(rows) if r[0]]
    valid = [r[3:] for r in rows if r[2]]
    differ = any(v != valid[0] for v in valid)
    if not failed and not differ:
        return
    if len(failed) == world and not differ:
        raise local_error  # every rank rejected its inputs: each stops with its own error
    parts = []
    if failed:  # every rank takes this branch together: the second all-gather is collective too
        texts = _all_gather_text(text, [r[1] for r in rows], group, device)
        by_text: dict[str, list[int]] = {}
        for i in failed:
            by_text.setdefault(texts[i], []).append(i)
        parts += [f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} rejected "
                  f"{'its' if len(ranks) == 1 else 'their'} inputs: {t}" for t, ranks in by_text.items()]
    if differ:
        table = "; ".join(f"rank {i}: " + (", ".join(f"{n}={x}" for n, x in zip(names, r[3:])) if r[2]
                                          else "(see its error)") for i, r in enumerate(rows))
        parts.append("every rank of the sequence-parallel group must pass the same shapes and options, "
                     f"got {table}")
    raise ValueError(f"{what}: " + "; and ".join(parts)) from local_error


def _all_gather_ints(values: list[int], group: ProcessGroup | None, device: torch.device) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    allv = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(allv, mine, group=group)
    return torch.stack(allv).tolist()


def _all_gather_text(text: bytes, lengths: list[int], group: ProcessGroup | None,
                     device: torch.device) -> list[str]:
    """Every rank's ``text`` (``lengths``: each rank's length in bytes), decoded."""
    buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
    buf[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    allb = [torch.empty_like(buf, device=device) for _ in lengths]
    dist.all_gather(allb, buf.to(device), group=group)
    return [bytes(b[:n].cpu().tolist()).decode(errors="replace") for b, n in zip(allb, lengths)]
