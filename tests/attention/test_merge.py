"""merge.py: block outputs merge into attention over all the keys; gradient blocks sum as zeros-plus-adds would."""

from __future__ import annotations

import pytest
import torch

from easy_context.attention.kernels import get_kernel
from easy_context.attention.merge import RowSum, merge_


def test_merging_two_key_blocks_equals_attention_over_both():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) * 4 for _ in range(3))  # large logits
    ref = get_kernel("reference")
    want_out, want_lse = ref.forward(q, k, v, False, 0.5)
    out, lse = ref.forward(q, k[:, :, :2], v[:, :, :2], False, 0.5)
    merge_(out, lse, *ref.forward(q, k[:, :, 2:], v[:, :, 2:], False, 0.5))
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_row_sum_equals_adding_blocks_into_zeros_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    like = torch.empty(1, 2, 16, 4)
    ranges = [slice(8, 16), slice(None), slice(2, 6), slice(0, 8), slice(5, 12), slice(14, 15)]
    acc, ref = RowSum(like, torch.float32), torch.zeros(like.shape)
    for rows in ranges:
        n = len(range(*rows.indices(16)))
        block = torch.randn(1, 2, n, 4, generator=g).to(torch.bfloat16)
        acc.add(rows, block)
        ref[:, :, rows] += block
    assert torch.equal(acc.result(), ref)


def test_row_sum_zeroes_rows_no_block_reached_and_continues_a_partial_sum():
    acc = RowSum(torch.empty(1, 1, 6, 2), torch.float32)
    acc.buf.fill_(float("nan"))  # stands for whatever memory the buffer was given
    acc.add(slice(1, 3), torch.ones(1, 1, 2, 2))
    assert torch.equal(acc.result()[0, 0, :, 0], torch.tensor([0.0, 1, 1, 0, 0, 0]))
    more = RowSum.of(acc.result().clone())
    more.add(slice(0, 2), torch.ones(1, 1, 2, 2))
    assert torch.equal(more.result()[0, 0, :, 0], torch.tensor([1.0, 2, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="contiguous row ranges"):
        more.add(slice(0, 6, 2), torch.ones(1, 1, 3, 2))
