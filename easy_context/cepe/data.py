"""CEPE's inputs from plain token rows: which tokens the decoder reads (and is scored on) and which the encoder
reads, in chunks.

* ``warmup`` (the paper's ``load_strategy duplicate``): the encoder sees the decoder's own window, cut into chunks;
  rows are ``window`` tokens long.
* ``main``: rows hold ``context_chunks x chunk_size`` tokens of context, then the ``window``; the encoder reads the
  context in chunks, the decoder the window. The loss is on decoder tokens only.

A context that is not a whole number of chunks is padded at the end of its last chunk (mask False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.layouts import shard
from ..parallel.plan import ParallelPlan
from .config import STAGES
from .sharded import chunk_range

Tensor = torch.Tensor


@dataclass(frozen=True)
class CEPEBatch:
    """Decoder ``input_ids`` / ``labels`` [B, W] (HF style, -100: no loss), encoder ``chunk_ids`` / ``chunk_mask``
    [B, n, c] (mask None: no padding), and ``teacher_ids`` [B, T]: what a teacher reads, context then window."""

    input_ids: Tensor
    labels: Tensor | None
    chunk_ids: Tensor
    chunk_mask: Tensor | None
    teacher_ids: Tensor


def row_length(stage: str, *, window: int, context_chunks: int, chunk_size: int) -> int:
    """Tokens per data row: the window (warmup), or the context chunks then the window (main)."""
    if stage not in STAGES:
        raise ValueError(f"unknown CEPE stage {stage!r}: use one of {', '.join(STAGES)}")
    return window if stage == "warmup" else context_chunks * chunk_size + window


def to_chunks(context: Tensor, chunk_size: int, pad_id: int = 0) -> tuple[Tensor, Tensor | None]:
    """context [B, T] -> (chunk ids [B, ceil(T / c), c], mask of the same shape, None when T is a multiple of c)."""
    b, t = context.shape
    pad = -t % chunk_size
    if pad == 0:
        return context.reshape(b, t // chunk_size, chunk_size), None
    ids = F.pad(context, (0, pad), value=pad_id)
    mask = F.pad(torch.ones_like(context, dtype=torch.bool), (0, pad), value=False)
    return ids.reshape(b, -1, chunk_size), mask.reshape(b, -1, chunk_size)


def split_rows(ids: Tensor, labels: Tensor | None, *, stage: str, window: int, chunk_size: int,
               pad_id: int = 0, device: torch.device | str | None = None) -> CEPEBatch:
    """The CEPE batch of rows ``ids`` [B, L] (``labels`` [B, L] or None: loss on every decoder token): the last
    ``window`` tokens to the decoder; to the encoder, the tokens before them (main) or the window itself (warmup);
    every tensor on ``device`` (default: where ``ids`` is)."""
    if stage not in STAGES:
        raise ValueError(f"unknown CEPE stage {stage!r}: use one of {', '.join(STAGES)}")
    if ids.shape[1] < window or (stage == "main" and ids.shape[1] == window):
        raise ValueError(f"rows of {ids.shape[1]} tokens hold no {'context and ' if stage == 'main' else ''}"
                         f"{window}-token window")
    if device is not None:
        ids, labels = ids.to(device), None if labels is None else labels.to(device)
    decoder = ids[:, -window:]
    context = decoder if stage == "warmup" else ids[:, :-window]
    chunk_ids, chunk_mask = to_chunks(context, chunk_size, pad_id)
    return CEPEBatch(decoder, None if labels is None else labels[:, -window:], chunk_ids, chunk_mask,
                     ids if stage == "main" else decoder)


def rank_inputs(batch: CEPEBatch, plan: ParallelPlan, teacher: tuple[Tensor, Tensor] | None = None) -> tuple:
    """This rank's arguments of ``loss.CEPEWithLoss`` from a full batch (the same on every rank of an SP group):
    (input_ids, target_ids, position_ids) of its window shard (labels shifted once; None: every token scored),
    its share of the chunks (``sharded.chunk_range``) and mask, and its shard of the teacher's top-k (probs, ids)
    [B, W, k] (or None, None)."""
    labels = batch.input_ids if batch.labels is None else batch.labels
    inputs = plan.shard_inputs(batch.input_ids, labels)
    chunk_ids, chunk_mask = batch.chunk_ids, batch.chunk_mask
    probs, ids = (None, None) if teacher is None else teacher
    if plan.sequence_parallel:
        rank, world = plan.groups.sp_rank, plan.groups.sp_size
        mine = chunk_range(chunk_ids.shape[1], rank, world)
        chunk_ids = chunk_ids[:, mine.start:mine.stop]
        chunk_mask = None if chunk_mask is None else chunk_mask[:, mine.start:mine.stop]
        if teacher is not None:
            probs, ids = (shard(t, plan.layout, rank, world, dim=1) for t in teacher)
    return inputs.input_ids, inputs.target_ids, inputs.position_ids, chunk_ids, chunk_mask, probs, ids
