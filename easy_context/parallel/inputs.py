"""Turn one full training batch into this rank's sequence-parallel shard: ids, global positions, targets.

Label convention: ``labels`` are Hugging Face style, aligned with ``input_ids`` (usually a copy of them,
-100 where no loss is wanted). They are shifted ONCE on the full sequence before sharding:
``target_ids[:, i] = labels[:, i + 1]`` and the last position gets -100, so the length stays S and
``target_ids`` is the token each position must predict. Never pass ``target_ids`` to a Hugging Face
model's ``labels=`` (it would shift a second time, inside each shard); use ``loss.py`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention.comm import check_same_across_ranks
from ..attention.layouts import check_length, shard
from ..attention.registry import get_backend
from .groups import group_layout, group_rank_size, sp_process_group

Tensor = torch.Tensor


@dataclass(frozen=True)
class SeqParallelInputs:
    """One rank's shard: ``input_ids``/``position_ids`` go to the model, ``target_ids`` to the loss."""

    input_ids: Tensor
    position_ids: Tensor
    target_ids: Tensor | None


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[B, S] targets: labels moved one position left, ``ignore_index`` in the last position."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def _check_positions(position_ids: Tensor, allow_skips: bool = False) -> None:
    # One document per row: positions must rise by exactly 1 (with allow_skips, by at least 1: PoSE).
    # Restarting positions mean packed documents, which these backends would attend across (they take
    # no document mask).
    steps = position_ids.diff(dim=1)
    if position_ids.shape[1] > 1 and not bool((steps >= 1 if allow_skips else steps == 1).all()):
        rule = "increase" if allow_skips else "count up by 1"
        raise ValueError(f"position_ids must {rule} along each row (one document per row): packed "
                         "documents with restarting positions are not supported, since sequence-parallel "
                         "attention would attend across document boundaries; pass one document per row"
                         + ("" if allow_skips else " (allow_position_skips=True accepts PoSE-style forward jumps)"))


def prepare_seq_parallel_inputs(backend: str, input_ids: Tensor, labels: Tensor | None = None,
                                position_ids: Tensor | None = None, *, rank: int | None = None,
                                world: int | None = None, group=None, ignore_index: int = -100,
                                check: bool = True, allow_position_skips: bool = False) -> SeqParallelInputs:
    """This rank's shard of a full batch for ``backend``'s layout (EasyContext's entry point): ``shard_batch``
    in the layout of ``backend`` on ``group`` (USP: its ``new_usp_group`` object, which fixes the layout)."""
    layout = group_layout(get_backend(backend).layout, group)
    return shard_batch(layout, input_ids, labels, position_ids, rank=rank, world=world, group=group,
                       ignore_index=ignore_index, check=check, allow_position_skips=allow_position_skips)


def _check_shapes(input_ids: Tensor, labels: Tensor | None, position_ids: Tensor | None) -> Tensor:
    """ValueError for shapes that do not fit; returns the position ids (default ``arange(S)``)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    if position_ids is None:
        return torch.arange(s, device=input_ids.device).unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids must be [{b} or 1, {s}]; got shape {tuple(position_ids.shape)}")
    return position_ids


def whole_batch(input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None, *,
                ignore_index: int = -100, allow_position_skips: bool = False) -> SeqParallelInputs:
    """A full batch unsplit, as one rank of one that runs whole sequences sees it: labels shifted once."""
    position_ids = _check_shapes(input_ids, labels, position_ids)
    _check_positions(position_ids, allow_position_skips)
    targets = None if labels is None else shift_labels(labels, ignore_index)
    return SeqParallelInputs(input_ids, position_ids, targets)


def shard_batch(layout: str, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
                *, rank: int | None = None, world: int | None = None, group=None, ignore_index: int = -100,
                check: bool = True, allow_position_skips: bool = False) -> SeqParallelInputs:
    """This rank's shard of a full batch in ``layout``; labels are shifted once first (module doc).

    input_ids [B, S] (the full batch, identical on every rank of the SP group); labels [B, S] or None
    (no targets); position_ids [B, S] or [1, S], default ``arange(S)``. ``group`` is the SP group the
    model's attention runs on (None: the world); ``rank``/``world`` default to this rank's place in it.
    With ``check``, when rank and world come from ``group``, a tiny collective verifies that every rank of
    the group passed the same batch. ``allow_position_skips`` accepts positions that jump forward (PoSE).
    """
    position_ids = _check_shapes(input_ids, labels, position_ids)
    if (rank is None) != (world is None):
        raise ValueError("pass both rank and world, or neither (then they come from group)")
    from_group = rank is None
    if from_group:
        rank, world = group_rank_size(group)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a sequence-parallel group of {world} ranks")
    check_length(input_ids.shape[1], layout, world)
    _check_positions(position_ids, allow_position_skips)
    if check and from_group and world > 1 and dist.is_initialized():
        _check_same_batch(input_ids, sp_process_group(group))

    def local(x: Tensor) -> Tensor:
        return shard(x, layout, rank, world, dim=1)

    targets = None if labels is None else local(shift_labels(labels, ignore_index))
    return SeqParallelInputs(local(input_ids), local(position_ids), targets)


def _check_same_batch(input_ids: Tensor, group) -> None:
    # Shape plus two checksums (the second is position-weighted, so it catches reordered tokens).
    ids = input_ids.long()
    weights = torch.arange(ids.shape[1], device=ids.device) % 997 + 1
    summary = [*ids.shape, int(ids.sum()), int((ids * weights).sum())]
    check_same_across_ranks(summary, ["batch", "seq", "sum", "weighted_sum"], group, ids.device,
                            "prepare_seq_parallel_inputs (the full batch)")
