"""Process groups for data x sequence parallelism: the world is cut into SP groups of consecutive ranks.

With W ranks and ``sp_size`` S, SP group g holds ranks [g*S, (g+1)*S) (consecutive, so an SP group sits
on one node's fast links), and DP group j holds the ranks with SP rank j: {j, j+S, j+2S, ...}. Every SP
group trains on its own batch; the ranks of one SP group share one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..attention.comm import rank_and_size
from ..attention.usp import new_usp_group

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's SP and DP process groups and its coordinates in the DP x SP grid."""

    sp_group: ProcessGroup
    dp_group: ProcessGroup
    sp_rank: int
    sp_size: int
    dp_rank: int
    dp_size: int


def init_groups(sp_size: int) -> ParallelGroups:
    """Collective over the world: build every SP and DP group and return this rank's (see module doc)."""
    if not (dist.is_available() and dist.is_initialized()):
        if sp_size == 1:  # one plain process: nothing to split
            return ParallelGroups(None, None, 0, 1, 0, 1)
        raise RuntimeError("init_groups needs torch.distributed: call dist.init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"sp_size must be a positive divisor of the world size {world} so every sequence-"
                         f"parallel group is full; got {sp_size!r}: choose one of {divisors}")
    dp_size = world // sp_size
    sp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    for g in range(dp_size):
        group = dist.new_group(list(range(g * sp_size, (g + 1) * sp_size)))
        if g == rank // sp_size:
            sp_group = group
    for j in range(sp_size):
        group = dist.new_group(list(range(j, world, sp_size)))
        if j == rank % sp_size:
            dp_group = group
    return ParallelGroups(sp_group, dp_group, rank % sp_size, sp_size, rank // sp_size, dp_size)


def sp_process_group(group) -> ProcessGroup | None:
    """The ProcessGroup spanning a whole SP group (None: the world) from a ProcessGroup, None, or a
    backend's composite group object that carries it as ``sp_group`` (e.g. ``usp.USPGroup``)."""
    if group is None or isinstance(group, ProcessGroup):
        return group
    if hasattr(group, "sp_group"):
        return group.sp_group
    raise ValueError(f"{type(group).__name__} is not a sequence-parallel group: pass a torch.distributed "
                     "ProcessGroup, None (the world), or a backend group object with an sp_group attribute")


def group_rank_size(group) -> tuple[int, int]:
    """(rank, size) of this rank within an SP group (any form ``sp_process_group`` accepts)."""
    return rank_and_size(sp_process_group(group))


def group_layout(layout: str, group) -> str:
    """The concrete layout for a backend's ``layout`` in ``group``: a composite group's own (USP's
    ``usp{U}x{R}`` depends on its degrees) when it names one, else ``layout``."""
    return getattr(group, "layout", None) or layout


def attention_group(backend: str, groups: ParallelGroups, *, ulysses_degree: int | None = None):
    """The group object ``backend``'s attention runs on: the SP ProcessGroup, or for "usp" a USP group of
    ``ulysses_degree`` x (sp_size / ulysses_degree) over this rank's SP group (collective)."""
    if backend != "usp":
        return groups.sp_group

    ulysses = ulysses_degree or groups.sp_size
    if groups.sp_size % ulysses:
        raise ValueError(f"--ulysses-degree {ulysses} must divide the sequence-parallel size {groups.sp_size}")
    first = (dist.get_rank() if dist.is_initialized() else 0) - groups.sp_rank
    return new_usp_group(ulysses_degree=ulysses, ring_degree=groups.sp_size // ulysses,
                         sp_ranks=list(range(first, first + groups.sp_size)))
