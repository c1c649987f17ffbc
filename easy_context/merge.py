"""Numerically stable merge of partial attention results computed over disjoint key blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def merge_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """In place: fold (block_out [B,H,S,D], block_lse [B,H,S]) into the float32 running (out, lse).

    Uses O <- O - sigmoid(Lb - L) (O - Ob), L <- L - logsigmoid(L - Lb), which equals
    L' = log(e^L + e^Lb), O' = e^(L-L') O + e^(Lb-L') Ob without ever exponentiating a large positive.
    ``out``/``lse`` may be views (e.g. the second half of the local rows); they are updated through.
    """
    block_lse = block_lse.to(lse.dtype)
    w = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.sub_(w * (out - block_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - block_lse))
