"""Packed documents: where each document of a row starts and ends, and what that leaves of causal attention.

A batch row may hold several documents back to back. ``Documents`` keeps their boundaries over the whole
(unsharded) sequence as cumulative lengths per row, ``(0, end of document 0, ..., S)``, known alike on every
rank of a sequence-parallel group (each holds the full batch). With documents, each token attends causally
within its own document only, and its position restarts with its document.

From position ids (``Documents.from_position_ids``): a new document starts wherever a position is not larger
than the one before it, the convention of Hugging Face's ``DataCollatorWithFlattening`` (positions restart at 0).
Forward jumps (PoSE) do not start a document.

What a backend computes of a block of local queries against a block of keys (``block_pieces``), given the global
token ranges both hold: the ranges are first cut at each other's ends, so that two of them are either the same (a
diagonal block) or disjoint. A diagonal block that holds several documents becomes one varlen call
(``cu_seqlens``), and one plain call when one document covers it. Of two disjoint ranges only the one document that
spans the gap between them can join them, so that part is a single unmasked rectangle, and nothing when no
document spans the gap: blocks whose documents do not overlap are skipped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .layouts import gather, local_ranges
from .precision import accumulation_dtype

Tensor = torch.Tensor
Bounds = tuple[int, ...]
ALL = slice(None)


def _check_bounds(bounds: Sequence[int], seq_len: int | None, what: str) -> Bounds:
    b = tuple(int(x) for x in bounds)
    if len(b) < 2 or b[0] != 0 or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"{what} must rise strictly from 0 to the sequence length (cumulative document lengths, "
                         f"no empty document), e.g. (0, 100, 250, 256); got {list(b)}")
    if seq_len is not None and b[-1] != seq_len:
        raise ValueError(f"{what} must end at the sequence length {seq_len}; got {list(b)}")
    return b


@dataclass(frozen=True)
class Documents:
    """The documents of a batch: ``bounds[b]`` = (0, end of document 0, ..., S) of row b over the whole sequence,
    or a single entry shared by every row."""

    bounds: tuple[Bounds, ...]

    def __post_init__(self):
        if not self.bounds:
            raise ValueError("Documents needs the bounds of at least one row")
        first = _check_bounds(self.bounds[0], None, "document bounds")
        rows = tuple(_check_bounds(b, first[-1], "document bounds") for b in self.bounds)
        if len(set(rows)) == 1:
            rows = rows[:1]
        object.__setattr__(self, "bounds", rows)

    @property
    def seq_len(self) -> int:
        """The whole sequence's length S."""
        return self.bounds[0][-1]

    @property
    def shared(self) -> bool:
        """True when every row has the same documents."""
        return len(self.bounds) == 1

    def check_batch(self, batch: int, seq_len: int, what: str) -> None:
        """ValueError unless these documents describe ``batch`` rows of ``seq_len`` tokens."""
        if self.seq_len != seq_len:
            raise ValueError(f"{what}: the documents cover {self.seq_len} tokens, but the whole sequence has "
                             f"{seq_len}; build them from the full (unsharded) batch")
        if len(self.bounds) not in (1, batch):
            raise ValueError(f"{what}: documents for {len(self.bounds)} rows, but the batch has {batch}")

    def row_groups(self, batch: int) -> list[tuple[slice, Bounds]]:
        """(rows, bounds) for every run of consecutive batch rows that share their documents."""
        if self.shared:
            return [(ALL, self.bounds[0])]
        groups: list[tuple[slice, Bounds]] = []
        for b, bounds in enumerate(self.bounds):
            if groups and groups[-1][1] == bounds:
                groups[-1] = (slice(groups[-1][0].start, b + 1), bounds)
            else:
                groups.append((slice(b, b + 1), bounds))
        return groups

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> Documents | None:
        """Documents of full-sequence position ids [B or 1, S]: one starts at every position not larger than the
        one before it. None when every row is one document."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, seq]; got shape {tuple(position_ids.shape)}")
        starts = position_ids[:, 1:] <= position_ids[:, :-1]
        if position_ids.shape[1] < 2 or not bool(starts.any()):
            return None
        s = position_ids.shape[1]
        rows = [(0, *(torch.nonzero(r).flatten() + 1).tolist(), s) for r in starts.cpu()]
        return cls(tuple(rows))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, seq_len: int) -> Documents:
        """Documents from cumulative lengths: one sequence ``(0, l0, l0 + l1, ..., S)`` for every row, or one per
        row (a list of them, or a [B, n + 1] tensor)."""
        if isinstance(cu_seqlens, Tensor):
            cu_seqlens = cu_seqlens.tolist()
        rows = cu_seqlens if cu_seqlens and isinstance(cu_seqlens[0], (list, tuple)) else [cu_seqlens]
        return cls(tuple(_check_bounds(r, seq_len, "cu_seqlens") for r in rows))

    def position_ids(self, device=None) -> Tensor:
        """[rows, S] positions that restart at 0 with every document."""
        s = self.seq_len
        out = torch.empty(len(self.bounds), s, dtype=torch.long)
        for row, bounds in zip(out, self.bounds):
            for a, b in zip(bounds, bounds[1:]):
                row[a:b] = torch.arange(b - a)
        return out.to(device)

    def last_tokens(self, device=None) -> Tensor:
        """[rows, S] bool, True at the last token of every document."""
        out = torch.zeros(len(self.bounds), self.seq_len, dtype=torch.bool)
        for row, bounds in zip(out, self.bounds):
            row[[b - 1 for b in bounds[1:]]] = True
        return out.to(device)


def gather_documents(position_ids: Tensor, layout: str, group: dist.ProcessGroup | None = None) -> Documents | None:
    """Collective over ``group``: the documents of the whole sequence from every rank's ``layout`` shard of the
    position ids (the same ``Documents`` on every rank; None when every row is one document)."""
    return Documents.from_position_ids(gather(position_ids, layout, group))


# --- what of a block survives the documents -----------------------------------------------------------------


Span = tuple[int, int, int]  # (first local row, first global token, length)


def rank_spans(seq_len: int, layout: str, rank: int, world: int) -> list[Span]:
    """The token ranges ``rank`` holds in ``layout``, as (first local row, first global token, length)."""
    spans, local = [], 0
    for a, b in local_ranges(seq_len, layout, rank, world):
        spans.append((local, a, b - a))
        local += b - a
    return spans


@dataclass(frozen=True)
class Piece:
    """One call of a block cut by documents: local q rows ``q`` against local k rows ``k``; ``cu_seqlens``
    (relative to the rows, q and k alike) when several documents share a diagonal block, else one plain call."""

    q: slice
    k: slice
    causal: bool
    cu_seqlens: Bounds | None = None


def _restrict(spans: list[Span], rows: slice, total: int) -> list[Span]:
    start, stop, _ = rows.indices(total)
    out = []
    for local, glob, n in spans:
        lo, hi = max(start, local), min(stop, local + n)
        if lo < hi:
            out.append((lo, glob + lo - local, hi - lo))
    return out


def _cut(spans: list[Span], cuts: list[int]) -> list[Span]:
    """``spans`` split at every global token index in ``cuts``: two spans cut at each other's ends are then
    either the same tokens or disjoint."""
    out = []
    for local, glob, n in spans:
        edges = [glob, *(c for c in cuts if glob < c < glob + n), glob + n]
        out += [(local + a - glob, a, b - a) for a, b in zip(edges, edges[1:])]
    return out


def _document_of(bounds: Bounds, token: int) -> tuple[int, int]:
    """[start, end) of the document that holds ``token``."""
    d = bisect.bisect_right(bounds, token) - 1
    return bounds[d], bounds[d + 1]


def block_pieces(bounds: Bounds, q_spans: list[Span], k_spans: list[Span], q_rows: slice, k_rows: slice,
                 causal: bool) -> list[Piece]:
    """The calls that compute local q rows ``q_rows`` against k rows ``k_rows`` (``causal``: top-left aligned, in
    the global order the spans give) within documents ``bounds``; diagonal pieces first. See the module doc."""
    qs = _restrict(q_spans, q_rows, sum(n for *_, n in q_spans))
    ks = _restrict(k_spans, k_rows, sum(n for *_, n in k_spans))
    cuts = sorted({g for _, g0, n in qs + ks for g in (g0, g0 + n)})
    diagonal, rectangles = [], []
    for ql, qg, n in _cut(qs, cuts):
        for kl, kg, m in _cut(ks, cuts):
            if (qg, n) == (kg, m):
                inner = tuple(b - qg for b in bounds if qg < b < qg + n)
                cu = (0, *inner, n) if inner else None
                diagonal.append(Piece(slice(ql, ql + n), slice(kl, kl + m), causal, cu))
            elif kg + m <= qg:  # keys before queries: the document that holds the last key may reach on
                start, end = _document_of(bounds, kg + m - 1)
                if end > qg:
                    rectangles.append(Piece(slice(ql, ql + min(n, end - qg)), slice(kl + max(0, start - kg), kl + m),
                                            False))
            elif qg + n <= kg:  # keys after queries: only without a causal mask
                start, end = _document_of(bounds, qg + n - 1)
                if not causal and end > kg:
                    rectangles.append(Piece(slice(ql + max(0, start - qg), ql + n), slice(kl, kl + min(m, end - kg)),
                                            False))
    return diagonal + rectangles


# --- per batch row groups ----------------------------------------------------------------------------------


def forward_by_rows(fn: Callable, q: Tensor, k: Tensor, v: Tensor, documents: Documents,
                    *args) -> tuple[Tensor, Tensor]:
    """``fn(q, k, v, bounds, *args) -> (out, lse)`` once per group of rows that share their documents, assembled
    (out like q, lse [B, H, S] in the accumulation dtype); one call when every row has the same documents."""
    groups = documents.row_groups(q.shape[0])
    if len(groups) == 1:
        return fn(q, k, v, groups[0][1], *args)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype), device=q.device)
    for rows, bounds in groups:
        out[rows], lse[rows] = fn(q[rows], k[rows], v[rows], bounds, *args)
    return out, lse


def backward_by_rows(fn: Callable, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     documents: Documents, *args) -> tuple[Tensor, Tensor, Tensor]:
    """``fn(dout, q, k, v, out, lse, bounds, *args) -> (dq, dk, dv)`` once per group of rows that share their
    documents, assembled like q, k, v."""
    groups = documents.row_groups(q.shape[0])
    if len(groups) == 1:
        return fn(dout, q, k, v, out, lse, groups[0][1], *args)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for rows, bounds in groups:
        dq[rows], dk[rows], dv[rows] = fn(dout[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], bounds, *args)
    return dq, dk, dv


# --- how much work each rank gets ----------------------------------------------------------------------------


def _causal_pairs(bounds: Bounds, a: int, b: int) -> int:
    """Unmasked (query, key) pairs of the queries in tokens [a, b): each sees its document up to itself."""
    total = 0
    d = bisect.bisect_right(bounds, a) - 1
    while d + 1 < len(bounds) and bounds[d] < b:
        start, end = bounds[d], bounds[d + 1]
        lo, hi = max(a, start), min(b, end)
        if lo < hi:  # sum over i in [lo, hi) of (i - start + 1)
            first, last = lo - start + 1, hi - start
            total += (first + last) * (hi - lo) // 2
        d += 1
    return total


def attention_work(bounds: Sequence[int], layout: str, world: int) -> list[int]:
    """Per rank, the unmasked (query, key) pairs of causal attention within documents ``bounds`` (cumulative
    lengths over the whole sequence) for the queries that rank holds in ``layout``: its share of the work."""
    b = _check_bounds(bounds, None, "bounds")
    return [sum(_causal_pairs(b, lo, hi) for lo, hi in local_ranges(b[-1], layout, rank, world))
            for rank in range(world)]
