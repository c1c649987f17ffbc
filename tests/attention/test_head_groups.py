"""Head groups: long blocks split over groups of kv heads give the same out, lse and gradients as one call."""

from __future__ import annotations

import pytest
import torch

from easy_context import zigzag_ring_attention
from easy_context.attention import head_groups
from easy_context.attention.head_groups import head_chunks
from easy_context.attention.kernels import get_kernel
from tests.helpers.reference import check_against_full

TOL64 = dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-10)


def _qk(h: int, h_kv: int, s: int = 8, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(1, h, s, d), torch.empty(1, h_kv, s, d)


def test_head_chunks_cover_every_head_once_in_whole_kv_groups():
    q, k = _qk(32, 8)  # 4 q heads per kv head; one kv group's q is 4 * 8 * 4 = 128 elements
    assert head_chunks(q, k, max_elements=10 ** 9) == [(slice(0, 32), slice(0, 8))]
    chunks = head_chunks(q, k, max_elements=300)  # two kv groups (256 elements) per call
    assert chunks == [(slice(2 * i * 4, 2 * (i + 1) * 4), slice(2 * i, 2 * (i + 1))) for i in range(4)]
    # a single group larger than the limit still runs (one group per call), never an empty call
    assert head_chunks(q, k, max_elements=1) == [(slice(4 * g, 4 * g + 4), slice(g, g + 1)) for g in range(8)]
    # uneven split: the last call takes what is left
    q, k = _qk(6, 3)
    assert head_chunks(q, k, max_elements=2 * 2 * 8 * 4) == [(slice(0, 4), slice(0, 2)), (slice(4, 6), slice(2, 3))]


@pytest.mark.parametrize("h,h_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("name,dtype", [("cpu_flash", torch.float32), ("reference", torch.float64)])
@pytest.mark.parametrize("bshd", [False, True])
def test_split_calls_equal_one_call(monkeypatch, h, h_kv, name, dtype, bshd):
    kernel = get_kernel(name)
    g = torch.Generator().manual_seed(0)

    def make(heads):
        t = torch.randn(2, heads, 24, 16, generator=g, dtype=dtype)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if bshd else t

    q, k, v, dout = make(h), make(h_kv), make(h_kv), make(h)
    for causal in (True, False):
        whole = kernel.forward(q, k, v, causal, 0.25)
        whole_grads = kernel.backward(dout, q, k, v, *whole, causal, 0.25)
        monkeypatch.setattr(head_groups, "MAX_CALL_ELEMENTS", 2 * 24 * 16 * (h // h_kv))  # 2 batch rows x 1 kv group
        assert len(head_chunks(q, k)) == h_kv
        split = kernel.forward(q, k, v, causal, 0.25)
        split_grads = kernel.backward(dout, q, k, v, *split, causal, 0.25)
        monkeypatch.undo()
        for a, b in zip(whole + whole_grads, split + split_grads):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bshd", [False, True])
def test_split_calls_inside_a_ring_match_full_attention(monkeypatch, seed, bshd):
    # One process: the zigzag schedule's blocks (full causal, then halves in backward) each split in 3 calls.
    monkeypatch.setattr(head_groups, "MAX_CALL_ELEMENTS", 2 * 12 * 16)
    errs = check_against_full(zigzag_ring_attention, 0, 1, "zigzag", causal=True, heads=6, kv_heads=3, head_dim=16,
                              chunk=6, dtype=torch.float64, device="cpu", seed=seed, tol=TOL64, bshd=bshd)
    assert max(errs.values()) < 1e-10
