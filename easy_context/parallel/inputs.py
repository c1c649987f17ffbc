"""Turn one full training batch into this rank's sequence-parallel shard: ids, global positions, targets.

Label convention: ``labels`` are Hugging Face style, aligned with ``input_ids`` (usually a copy of them,
-100 where no loss is wanted). They are shifted ONCE on the full sequence before sharding:
``target_ids[:, i] = labels[:, i + 1]`` and the last position gets -100, so the length stays S and
``target_ids`` is the token each position must predict. Never pass ``target_ids`` to a Hugging Face
model's ``labels=`` (it would shift a second time, inside each shard); use ``loss.py`` instead.

Packed documents: a row may hold several documents, given as position ids that restart at 0 with each document
(Hugging Face's ``DataCollatorWithFlattening``) or as cumulative lengths ``cu_seqlens`` (positions then restart
at each boundary). ``SeqParallelInputs.documents`` carries them for the whole sequence (every rank holds the full
batch, so no communication is needed); the last token of a document gets no target, since nothing of the next
document is visible to it. Each token then attends within its own document only (``attention.documents``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention.comm import check_same_across_ranks
from ..attention.documents import Documents
from ..attention.layouts import check_length, shard
from ..attention.registry import get_backend
from .groups import group_layout, group_rank_size, sp_process_group

Tensor = torch.Tensor


@dataclass(frozen=True)
class SeqParallelInputs:
    """One rank's shard: ``input_ids``/``position_ids`` go to the model, ``target_ids`` to the loss; ``documents``:
    the packed documents of the whole sequence (None: one document per row), for the model's attention."""

    input_ids: Tensor
    position_ids: Tensor
    target_ids: Tensor | None
    documents: Documents | None = None


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[B, S] targets: labels moved one position left, ``ignore_index`` in the last position."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def _check_positions(position_ids: Tensor, allow_skips: bool = False) -> Documents | None:
    """The packed documents the positions describe (None: one per row); ValueError for positions that make no sense.

    Along a row positions count up by 1; a document starts where they restart at 0. With ``allow_skips`` (PoSE)
    they may jump forward instead, and may not restart: PoSE positions for packed documents are not supported.
    """
    if position_ids.shape[1] < 2:
        return None
    steps = position_ids.diff(dim=1)
    restarts = steps <= 0
    jumps = steps > 1
    if bool(jumps.any()) and not allow_skips:
        raise ValueError("position_ids must count up by 1 along each row, or restart at 0 where a packed document "
                         "starts; they jump forward here (allow_position_skips=True accepts PoSE-style jumps)")
    if bool(restarts.any()):
        if allow_skips:
            raise ValueError("position_ids restart (packed documents) although allow_position_skips declares PoSE "
                             "positions; PoSE positions for packed documents are not supported: use one or the other")
        if bool((position_ids[:, 1:][restarts] != 0).any()):
            raise ValueError("position_ids restart at a value other than 0: a packed document's positions must "
                             "start at 0 (as DataCollatorWithFlattening gives them) and count up by 1")
    return Documents.from_position_ids(position_ids)


def _documents(position_ids: Tensor | None, cu_seqlens, seq_len: int, device,
               allow_skips: bool) -> tuple[Tensor, Documents | None]:
    """(position ids, documents) from what the caller gave: positions (default ``arange(S)``), cumulative
    lengths (positions then restart with each document), or both when they agree."""
    if cu_seqlens is None:
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0) if position_ids is None else position_ids
        return position_ids, _check_positions(position_ids, allow_skips)
    if allow_skips:
        raise ValueError("cu_seqlens (packed documents) with allow_position_skips (PoSE) is not supported: "
                         "PoSE positions for packed documents are not supported")
    docs = Documents.from_cu_seqlens(cu_seqlens, seq_len)
    if position_ids is None:
        return docs.position_ids(device), docs
    if _check_positions(position_ids) != docs:
        raise ValueError("position_ids and cu_seqlens describe different documents: positions must restart at 0 "
                         "exactly where cu_seqlens starts a document (or pass only one of them)")
    return position_ids, docs


def _targets(labels: Tensor | None, documents: Documents | None, ignore_index: int) -> Tensor | None:
    """Labels shifted once; with documents, no target for a document's last token (the next one's first)."""
    if labels is None:
        return None
    targets = shift_labels(labels, ignore_index)
    if documents is not None:
        targets = targets.masked_fill(documents.last_tokens(targets.device).expand_as(targets), ignore_index)
    return targets


def prepare_seq_parallel_inputs(backend: str, input_ids: Tensor, labels: Tensor | None = None,
                                position_ids: Tensor | None = None, *, rank: int | None = None,
                                world: int | None = None, group=None, ignore_index: int = -100,
                                check: bool = True, allow_position_skips: bool = False,
                                cu_seqlens=None) -> SeqParallelInputs:
    """This rank's shard of a full batch for ``backend``'s layout (EasyContext's entry point): ``shard_batch``
    in the layout of ``backend`` on ``group`` (USP: its ``new_usp_group`` object, which fixes the layout)."""
    layout = group_layout(get_backend(backend).layout, group)
    return shard_batch(layout, input_ids, labels, position_ids, rank=rank, world=world, group=group,
                       ignore_index=ignore_index, check=check, allow_position_skips=allow_position_skips,
                       cu_seqlens=cu_seqlens)


def _check_shapes(input_ids: Tensor, labels: Tensor | None, position_ids: Tensor | None) -> None:
    """ValueError for shapes that do not fit."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != s
                                     or position_ids.shape[0] not in (1, b)):
        raise ValueError(f"position_ids must be [{b} or 1, {s}]; got shape {tuple(position_ids.shape)}")


def _full_batch(input_ids: Tensor, labels: Tensor | None, position_ids: Tensor | None, cu_seqlens,
                allow_skips: bool) -> tuple[Tensor, Documents | None]:
    """Checked (position ids, documents) of a full batch; ValueError before any work."""
    _check_shapes(input_ids, labels, position_ids)
    position_ids, docs = _documents(position_ids, cu_seqlens, input_ids.shape[1], input_ids.device, allow_skips)
    if docs is not None and len(docs.bounds) not in (1, input_ids.shape[0]):
        raise ValueError(f"cu_seqlens gives documents for {len(docs.bounds)} rows, but the batch has "
                         f"{input_ids.shape[0]}")
    return position_ids, docs


def whole_batch(input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None, *,
                ignore_index: int = -100, allow_position_skips: bool = False,
                cu_seqlens=None) -> SeqParallelInputs:
    """A full batch unsplit, as one rank of one that runs whole sequences sees it: labels shifted once (and packed
    documents described, as in ``shard_batch``)."""
    position_ids, docs = _full_batch(input_ids, labels, position_ids, cu_seqlens, allow_position_skips)
    return SeqParallelInputs(input_ids, position_ids, _targets(labels, docs, ignore_index), docs)


def shard_batch(layout: str, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
                *, rank: int | None = None, world: int | None = None, group=None, ignore_index: int = -100,
                check: bool = True, allow_position_skips: bool = False, cu_seqlens=None) -> SeqParallelInputs:
    """This rank's shard of a full batch in ``layout``; labels are shifted once first (module doc).

    input_ids [B, S] (the full batch, identical on every rank of the SP group); labels [B, S] or None
    (no targets); position_ids [B, S] or [1, S], default ``arange(S)``, restarting at 0 with each packed
    document; or ``cu_seqlens`` (0, ..., S) per batch or per row. ``group`` is the SP group the
    model's attention runs on (None: the world); ``rank``/``world`` default to this rank's place in it.
    With ``check``, when rank and world come from ``group``, a tiny collective verifies that every rank of
    the group passed the same batch. ``allow_position_skips`` accepts positions that jump forward (PoSE).
    """
    position_ids, docs = _full_batch(input_ids, labels, position_ids, cu_seqlens, allow_position_skips)
    if (rank is None) != (world is None):
        raise ValueError("pass both rank and world, or neither (then they come from group)")
    from_group = rank is None
    if from_group:
        rank, world = group_rank_size(group)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a sequence-parallel group of {world} ranks")
    check_length(input_ids.shape[1], layout, world)
    if check and from_group and world > 1 and dist.is_initialized():
        _check_same_batch(input_ids, position_ids, sp_process_group(group))

    def local(x: Tensor | None) -> Tensor | None:
        return None if x is None else shard(x, layout, rank, world, dim=1)

    targets = _targets(labels, docs, ignore_index)
    return SeqParallelInputs(local(input_ids), local(position_ids), local(targets), docs)


def _check_same_batch(input_ids: Tensor, position_ids: Tensor, group) -> None:
    # Shape plus checksums (position-weighted ones catch reordered tokens; the positions carry the documents).
    ids, pos = input_ids.long(), position_ids.long()
    weights = torch.arange(ids.shape[1], device=ids.device) % 997 + 1
    summary = [*ids.shape, int(ids.sum()), int((ids * weights).sum()), int((pos * weights).sum())]
    check_same_across_ranks(summary, ["batch", "seq", "sum", "weighted_sum", "positions"], group, ids.device,
                            "prepare_seq_parallel_inputs (the full batch)")
