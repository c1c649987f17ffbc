"""The parallel plan of a job: its attention backend, process groups, input layout and kernel, resolved once.

``resolve_plan("zigzag_ring", sp_size=4)`` looks the backend up, builds the DP x SP groups (and USP's
subgroups), fixes the concrete input layout and checks that the pieces fit, all before any weights load.
The jobs hand the plan to everything that needs one of those facts, so no module looks the name up again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention.layouts import check_length
from ..attention.registry import Backend, get_backend
from .groups import ParallelGroups, attention_group, group_layout, init_groups
from .inputs import SeqParallelInputs, shard_batch, whole_batch

Tensor = torch.Tensor


@dataclass(frozen=True)
class ParallelPlan:
    """How one job runs: ``backend`` (a registry entry), this rank's ``groups``, the group object the attention
    runs on (``attention_group``: the SP ProcessGroup, a USP group, or None), the concrete input ``layout``
    and the local ``kernel`` (None: automatic)."""

    backend: Backend
    groups: ParallelGroups
    attention_group: Any
    layout: str
    kernel: str | None = None

    @property
    def sequence_parallel(self) -> bool:
        """True when the sequence is split over an SP group of more than one rank."""
        return self.backend.sequence_parallel and self.groups.sp_size > 1

    def check_length(self, seq_len: int) -> None:
        """ValueError unless a ``seq_len``-token sequence splits over the SP group in this layout."""
        if self.backend.sequence_parallel:
            check_length(seq_len, self.layout, self.groups.sp_size)

    def shard_inputs(self, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
                     *, allow_position_skips: bool = False, cu_seqlens=None) -> SeqParallelInputs:
        """This rank's (input_ids, position_ids, target_ids, documents) of a full batch [B, S] (labels shifted
        once; packed documents from positions that restart at 0, or from ``cu_seqlens``)."""
        if not self.backend.sequence_parallel:
            return whole_batch(input_ids, labels, position_ids, allow_position_skips=allow_position_skips,
                               cu_seqlens=cu_seqlens)
        return shard_batch(self.layout, input_ids, labels, position_ids, group=self.attention_group,
                           allow_position_skips=allow_position_skips, cu_seqlens=cu_seqlens)


def resolve_plan(backend: str, *, sp_size: int | None = None, ulysses_degree: int | None = None,
                 kernel: str | None = None) -> ParallelPlan:
    """Collective over the world: the plan for ``backend`` with SP groups of ``sp_size`` ranks (None: all
    processes; 1 for a backend that does not split the sequence) and USP's ``ulysses_degree``."""
    be = get_backend(backend)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not be.sequence_parallel:
        if sp_size not in (None, 1):
            raise ValueError(f"--sp-size {sp_size} needs a sequence-parallel backend; {be.name} runs each "
                             "sequence whole on one rank")
        sp_size = 1
    groups = init_groups(sp_size or world)
    group = attention_group(be.name, groups, ulysses_degree=ulysses_degree) if be.sequence_parallel else None
    return ParallelPlan(be, groups, group, group_layout(be.layout, group), kernel)
