"""USP (unified sequence parallelism): Ulysses all-to-all inside, zigzag ring attention outside.

The sequence-parallel group of P = U * R ranks is a U x R grid: SP rank ``ring_rank * U + ulysses_rank``.
Ulysses groups are U consecutive SP ranks (keep them within a node: the all-to-all is the heavy
traffic); ring groups are the R ranks with the same ulysses rank. Inputs are in the ``usp{U}x{R}``
layout (``layouts.py``): after the all-to-all over its Ulysses group, a rank holds H/U heads of
ring rank r's zigzag piece (chunks r and 2R-1-r of 2R), and the zigzag ring schedule runs unchanged
over the ring group (with packed documents, cut along them in the zigzag layout of R ranks).

``new_usp_group`` is collective over the whole world (``new_group`` is): every rank calls it, also
ranks of other SP groups when the world is data parallel x sequence parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import rank_and_size
from .documents import Documents
from .kernels import AttentionKernel
from .layouts import usp_layout
from .ring import prepare_call, ring_backward, ring_forward
from .ulysses import AllToAllAttention, head_split_error
from .zigzag import zigzag_schedule

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class USPGroup:
    """This rank's USP process groups (None = WORLD; a single rank needs no group)."""

    ulysses_degree: int
    ring_degree: int
    sp_group: ProcessGroup | None
    ulysses_group: ProcessGroup | None
    ring_group: ProcessGroup | None

    @property
    def layout(self) -> str:
        """The input layout for these degrees, ``usp{U}x{R}``."""
        return usp_layout(ulysses_degree=self.ulysses_degree, ring_degree=self.ring_degree)


def _check_degrees(ulysses_degree: int, ring_degree: int, sp_size: int) -> None:
    for n, d in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"new_usp_group: {n} must be a positive int, got {d!r}")
    if ulysses_degree * ring_degree != sp_size:
        raise ValueError(f"new_usp_group: ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) = "
                         f"{ulysses_degree * ring_degree}, but the sequence-parallel group has {sp_size} ranks; "
                         f"choose degrees whose product is {sp_size}")


def _all_sp_groups(ulysses_degree: int, ring_degree: int, sp_ranks: list[int] | None, world: int,
                   error: ValueError | None = None) -> list[list[int]]:
    """Collective: every SP group of the world in one order on all ranks, or the same ValueError on all
    ranks when they passed inconsistent arguments (mismatched new_group calls would hang instead).
    ``error``: this rank's own argument error, raised on every rank (alone it would leave the others waiting)."""
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (ulysses_degree, ring_degree, None if sp_ranks is None else list(sp_ranks),
                                      None if error is None else str(error).removeprefix("new_usp_group: ")))
    failed = [(i, e) for i, (*_, e) in enumerate(everyone) if e is not None]
    if len(failed) == world:
        raise error  # every rank rejected its arguments: each stops with its own error
    if failed:
        raise ValueError("new_usp_group: " + "; ".join(f"rank {i} rejected its arguments: {e}" for i, e in failed)
                         + "; every rank must pass the same valid arguments") from error
    if len({(u, r) for u, r, _, _ in everyone}) > 1 or len({s is None for _, _, s, _ in everyone}) > 1:
        table = "; ".join(f"rank {i}: {u}x{r} sp_ranks={s}" for i, (u, r, s, _) in enumerate(everyone))
        raise ValueError("new_usp_group: every rank must pass the same ulysses_degree and ring_degree, and "
                         f"either all ranks or none pass sp_ranks; got {table}")
    if everyone[0][2] is None:
        return [list(range(world))]
    groups: list[list[int]] = []
    for rank, (_, _, ranks, _) in enumerate(everyone):
        if rank not in ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
            raise ValueError(f"new_usp_group: rank {rank} passed sp_ranks={ranks}; each rank must pass the "
                             f"distinct global ranks (0..{world - 1}) of its own SP group, itself included")
        if ranks not in groups:
            clash = next((g for g in groups if set(ranks) & set(g)), None)
            if clash is not None:
                raise ValueError(f"new_usp_group: SP groups {clash} and {ranks} overlap; the ranks of one SP "
                                 "group must all pass the same list, in the same order")
            groups.append(ranks)
    return groups  # disjoint, each rank in its own, equal sizes: a partition of the world


def new_usp_group(*, ulysses_degree: int, ring_degree: int, sp_ranks: list[int] | None = None) -> USPGroup:
    """Collective over the world: build the Ulysses and ring subgroups of this rank's SP group.

    ``sp_ranks``: the global ranks of this rank's SP group in SP-rank order (None: the whole world is
    one SP group). With data parallelism every rank passes its own SP group (e.g. [0..3] on ranks 0-3
    and [4..7] on ranks 4-7); the lists are all-gathered so that all subgroups are created everywhere.
    ``ulysses_degree * ring_degree`` must equal the SP group size (ValueError before any group is created);
    both are keyword-only so they cannot be swapped by position. A ValueError on any rank, also one rank's
    own, is raised on all ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        _check_degrees(ulysses_degree, ring_degree, len(sp_ranks) if sp_ranks is not None else 1)
        return USPGroup(ulysses_degree, ring_degree, None, None, None)
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    try:
        _check_degrees(ulysses_degree, ring_degree, len(sp_ranks) if sp_ranks is not None else world)
    except ValueError as e:
        error = e
    mine = {}
    for sp in _all_sp_groups(ulysses_degree, ring_degree, sp_ranks, world, error):
        # Same new_group calls in the same order on every rank; keep the ones this rank belongs to.
        created = {"sp": [sp] if sp_ranks is not None else [],
                   "ulysses": [sp[r * ulysses_degree:(r + 1) * ulysses_degree] for r in range(ring_degree)],
                   "ring": [sp[u::ulysses_degree] for u in range(ulysses_degree)]}
        for kind, rank_lists in created.items():
            for ranks in rank_lists:
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = g
    return USPGroup(ulysses_degree, ring_degree, mine.get("sp"), mine["ulysses"], mine["ring"])


@dataclass(frozen=True)
class _ZigzagRing:
    """Zigzag ring attention over the ring subgroup: USP's inner attention after the all-to-all."""

    kernel: AttentionKernel
    causal: bool
    scale: float
    group: ProcessGroup | None
    documents: Documents | None = None

    def forward(self, q, k, v):
        return ring_forward(q, k, v, self.causal, self.scale, self.group, self.kernel, zigzag_schedule,
                            self.documents, "zigzag")

    def backward(self, dout, q, k, v, out, lse):
        return ring_backward(dout, q, k, v, out, lse, self.causal, self.scale, self.group, self.kernel,
                             zigzag_schedule, self.documents, "zigzag")


def _resolve_group(group) -> USPGroup:
    if isinstance(group, USPGroup):
        return group
    if group is None and rank_and_size(None)[1] == 1:
        return USPGroup(1, 1, None, None, None)
    raise ValueError("usp_attention: pass group=new_usp_group(ulysses_degree=..., ring_degree=...), "
                     f"the USP group object, not {type(group).__name__}")


def usp_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                  group: USPGroup | None = None, kernel: str | AttentionKernel | None = None,
                  return_lse: bool = False, check: bool = True, documents: Documents | None = None):
    """Exact attention over a sequence split in the ``usp{U}x{R}`` layout (``group.layout``) across ``group``.

    q [B, H, S_local, D], k/v [B, H_kv, S_local, D] with H divisible by U; ``group`` from ``new_usp_group``.
    Returns out [B, H, S_local, D] (q dtype), plus the float32 lse [B, H, S_local] if ``return_lse``.
    ``documents``: packed documents of the whole sequence, as in ``ring.ring_attention``.
    """
    name = "usp_attention"
    usp = _resolve_group(group)

    def usp_checks() -> None:
        u_world, r_world = rank_and_size(usp.ulysses_group)[1], rank_and_size(usp.ring_group)[1]
        if (u_world, r_world) != (usp.ulysses_degree, usp.ring_degree):
            raise ValueError(f"{name}: the group object's subgroups have sizes {u_world} x {r_world}, not the "
                             f"declared {usp.ulysses_degree} x {usp.ring_degree}; build it with new_usp_group")
        err = head_split_error(q.shape[1], usp.ulysses_degree, "Ulysses group (ulysses_degree)", name)
        if err:
            raise err
        if causal and usp.ring_degree > 1 and (q.shape[2] * usp.ulysses_degree) % 2:
            raise ValueError(f"{name}: local length {q.shape[2]} x ulysses_degree {usp.ulysses_degree} must be "
                             f"even (two zigzag chunks); shard with layouts.shard(..., '{usp.layout}', ...)")

    scale, kern = prepare_call(q, k, v, causal, scale, usp.sp_group, kernel, check, name, usp_checks, documents)
    inner = _ZigzagRing(kern, causal, scale, usp.ring_group, documents)
    out, lse = AllToAllAttention.apply(q, k, v, usp.ulysses_group, inner)
    return (out, lse) if return_lse else out
