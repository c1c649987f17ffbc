"""How a full sequence is split across sequence-parallel ranks, and how to put it back together.

A layout names which token ranges a rank holds:

* ``contiguous``: the sequence is cut into P equal chunks; rank r holds chunk r (ring, Ulysses).
* ``zigzag``: the sequence is cut into 2P equal chunks; rank r holds chunks r and 2P-1-r, so the
  causal work is the same on every rank (zigzag ring).
* ``usp{U}x{R}`` (e.g. ``usp2x2``, P = U * R): USP, Ulysses of degree U inside a zigzag ring of degree R.
  Rank ``ring_rank * U + ulysses_rank`` holds the ``ulysses_rank``-th contiguous 1/U of ring rank's
  zigzag piece (chunks r and 2R-1-r of 2R), so the Ulysses all-to-all, which concatenates the U pieces
  in ulysses-rank order, rebuilds exactly that zigzag piece. ``usp{P}x1`` equals ``contiguous`` and
  ``usp1x{P}`` equals ``zigzag``.

The same split applies to input ids, labels, position ids and activations alike.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from .comm import check_same_across_ranks, rank_and_size

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "zigzag", "usp{U}x{R}")
_USP = re.compile(r"usp([1-9][0-9]*)x([1-9][0-9]*)")
_MAX_DIMS = 8  # gather compares up to this many sizes across ranks (and the element count)


def usp_degrees(layout: str) -> tuple[int, int] | None:
    """(ulysses_degree, ring_degree) of a ``usp{U}x{R}`` layout name, None for any other name."""
    m = _USP.fullmatch(layout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def usp_layout(*, ulysses_degree: int, ring_degree: int) -> str:
    """The layout name for USP with these degrees, e.g. ``usp2x4``."""
    return f"usp{ulysses_degree}x{ring_degree}"


def _usp_degrees_for(layout: str, world: int) -> tuple[int, int] | None:
    deg = usp_degrees(layout)
    if deg is not None and deg[0] * deg[1] != world:
        raise ValueError(f"the {layout} layout is for {deg[0]} x {deg[1]} = {deg[0] * deg[1]} ranks, got {world}: "
                         f"use usp{{U}}x{{R}} with U * R = {world}")
    return deg


def num_chunks(layout: str, world: int) -> int:
    """How many equal chunks the full sequence is cut into."""
    if layout == "contiguous":
        return world
    if layout == "zigzag":
        return 2 * world
    if _usp_degrees_for(layout, world):
        return 2 * world
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def chunk_ids(layout: str, rank: int, world: int) -> list[int]:
    """Indices of the chunks (of ``num_chunks``) that ``rank`` holds, in local order."""
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    deg = _usp_degrees_for(layout, world)
    if deg:
        # Fine chunks of 1/(2RU): ring rank r's zigzag piece is fine chunks [rU, (r+1)U) then
        # [(2R-1-r)U, (2R-r)U); its 2U fine chunks are dealt out in pairs to the U ulysses ranks.
        u_deg, r_deg = deg
        ring_rank, u_rank = divmod(rank, u_deg)
        piece = [*range(ring_rank * u_deg, (ring_rank + 1) * u_deg),
                 *range((2 * r_deg - 1 - ring_rank) * u_deg, (2 * r_deg - ring_rank) * u_deg)]
        return piece[2 * u_rank: 2 * u_rank + 2]
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def check_length(seq_len: int, layout: str, world: int) -> int:
    """Return the chunk length, or raise a ValueError naming the multiple the length must be."""
    n = num_chunks(layout, world)
    if seq_len % n:
        lo, hi = seq_len - seq_len % n, seq_len + n - seq_len % n
        deg = usp_degrees(layout)
        if deg:
            why = f"2 x {deg[1]} ring x {deg[0]} ulysses ranks"
        else:
            why = f"2 x {world} ranks" if layout == "zigzag" else f"{world} ranks"
        raise ValueError(f"the {layout} layout over {world} ranks needs the sequence length to be a "
                         f"multiple of {n} ({why}); got {seq_len}: pad or truncate to {lo or n} or {hi}")
    return seq_len // n


def local_ranges(seq_len: int, layout: str, rank: int, world: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the full sequence that ``rank`` holds, in local order."""
    c = check_length(seq_len, layout, world)
    return [(i * c, (i + 1) * c) for i in chunk_ids(layout, rank, world)]


def shard(x: Tensor, layout: str, rank: int, world: int, dim: int = 1) -> Tensor:
    """This rank's local piece of the full tensor ``x`` along ``dim`` (the sequence dimension)."""
    ranges = local_ranges(x.shape[dim], layout, rank, world)
    pieces = [x.narrow(dim, a, b - a) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(pieces: list[Tensor], layout: str, dim: int = 1) -> Tensor:
    """Inverse of ``shard``: the full tensor from every rank's local piece (in rank order)."""
    world = len(pieces)
    n = num_chunks(layout, world)
    per_rank = n // world
    chunks: list[Tensor | None] = [None] * n
    for rank, piece in enumerate(pieces):
        for i, c in zip(chunk_ids(layout, rank, world), piece.chunk(per_rank, dim=dim)):
            chunks[i] = c
    return torch.cat(chunks, dim=dim)


def gather(x: Tensor, layout: str, group: dist.ProcessGroup | None = None, dim: int = 1,
           check: bool = True) -> Tensor:
    """Collective: all-gather every rank's local piece and return the full tensor on every rank.

    ``check`` first compares the pieces' shapes across ranks (one tiny collective), so that pieces that differ,
    or that one rank cannot cut into the layout's chunks, raise the same ValueError on every rank.
    """
    _, world = rank_and_size(group)
    if world == 1:
        return x
    if check:
        error = None
        try:
            per_rank = num_chunks(layout, world) // world
            if not -x.dim() <= dim < x.dim():
                raise ValueError(f"gather: dim {dim} is out of range for a piece of shape {tuple(x.shape)}")
            if x.shape[dim] % per_rank:
                raise ValueError(f"gather: a rank's piece of the {layout} layout is {per_rank} chunks, so its "
                                 f"length (dim {dim}) must be a multiple of {per_rank}; got {x.shape[dim]}")
        except ValueError as e:
            error = e
        shape = list(x.shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(x.dim(), _MAX_DIMS))
        check_same_across_ranks([x.dim(), x.numel(), x.element_size(), *shape],
                                ["dims", "numel", "dtype_bytes", *(f"size{i}" for i in range(_MAX_DIMS))],
                                group, x.device, "gather", local_error=error)
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard(pieces, layout, dim)


def position_ids(seq_len: int, layout: str, rank: int, world: int, device=None,
                 batch: int = 1) -> Tensor:
    """Global positions [batch, seq_len / world] of the tokens this rank holds (not contiguous for zigzag)."""
    full = torch.arange(seq_len, device=device).expand(batch, seq_len)
    return shard(full, layout, rank, world, dim=1)
