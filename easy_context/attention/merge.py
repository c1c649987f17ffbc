"""How per-block attention results combine: outputs by a numerically stable log-sum-exp merge, gradients by
a float32 sum that writes each row's first block instead of adding it to zeros."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import empty_in_order

Tensor = torch.Tensor


def merge_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """In place: fold (block_out [B,H,S,D], block_lse [B,H,S]) into the float32 running (out, lse).

    Uses O <- O + sigmoid(Lb - L) (Ob - O) (one lerp), L <- L - logsigmoid(L - Lb), which equals
    L' = log(e^L + e^Lb), O' = e^(L-L') O + e^(Lb-L') Ob without ever exponentiating a large positive.
    ``out``/``lse`` may be views (e.g. the second half of the local rows); they are updated through.
    """
    block_lse = block_lse.to(lse.dtype)
    out.lerp_(block_out.to(out.dtype), torch.sigmoid(block_lse - lse).unsqueeze(-1))
    lse.sub_(F.logsigmoid(lse - block_lse))


class RowSum:
    """The sum of gradient blocks, each over a range of rows (dim 2) of a [B, H, S, D] buffer, in ``dtype`` and
    in the memory order of the tensor it is the gradient of.

    A row's first block is copied in, later ones added, so the buffer is never zero-filled and never read
    before it is written; ``result()`` zeroes the rows no block reached.
    """

    def __init__(self, like: Tensor, dtype: torch.dtype):
        # like's memory order: the gradient then comes back strided as its input was, with no layout copy
        self.buf = empty_in_order(like, dtype)
        self._unwritten = [(0, like.shape[2])]  # sorted, disjoint row ranges

    @classmethod
    def of(cls, partial: Tensor) -> RowSum:
        """Continue a sum that another rank started (``partial``: every row already written)."""
        s = cls.__new__(cls)
        s.buf, s._unwritten = partial, []
        return s

    def add(self, rows: slice, block: Tensor) -> None:
        """Add ``block`` [B, H, len(rows), D] into ``rows`` (a slice with step 1)."""
        start, stop, step = rows.indices(self.buf.shape[2])
        if step != 1:
            raise ValueError("RowSum.add takes contiguous row ranges")
        first, keep = [], []
        for a, b in self._unwritten:
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                keep.append((a, b))
                continue
            first.append((lo, hi))
            keep += [r for r in ((a, lo), (hi, b)) if r[0] < r[1]]
        self._unwritten = sorted(keep)
        pos = start
        for lo, hi in first + [(stop, stop)]:
            if pos < lo:
                self.buf[:, :, pos:lo] += block[:, :, pos - start:lo - start]
            if lo < hi:
                self.buf[:, :, lo:hi].copy_(block[:, :, lo - start:hi - start])
            pos = hi

    def result(self) -> Tensor:
        """The summed buffer (rows no block reached are zero)."""
        for a, b in self._unwritten:
            self.buf[:, :, a:b].zero_()
        self._unwritten = []
        return self.buf
