"""Block kernels: long blocks split over head groups give the same out, lse and gradients as one call."""

from __future__ import annotations

import pytest
import torch

from easy_context import zigzag_ring_attention
from easy_context.attention import kernels
from easy_context.attention.kernels import get_kernel, head_chunks
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
        monkeypatch.setattr(kernels, "MAX_CALL_ELEMENTS", 2 * 24 * 16 * (h // h_kv))  # 2 batch rows x 1 kv group
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
    monkeypatch.setattr(kernels, "MAX_CALL_ELEMENTS", 2 * 12 * 16)
    errs = check_against_full(zigzag_ring_attention, 0, 1, "zigzag", causal=True, heads=6, kv_heads=3, head_dim=16,
                              chunk=6, dtype=torch.float64, device="cpu", seed=seed, tol=TOL64, bshd=bshd)
    assert max(errs.values()) < 1e-10


def test_ring_output_is_strided_like_its_query():
    # HF's q is a [B, S, H, D] buffer: the output keeps that order, so o_proj's input is a view, not a copy.
    q = torch.randn(1, 10, 4, 8).transpose(1, 2)
    out = zigzag_ring_attention(q, q, q)
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cudnn_gets_output_and_its_gradient_in_the_query_strides():
    # PyTorch keys its cuDNN backward graphs by q/k/v strides only, so O and dO must follow q's strides.
    q = torch.randn(1, 10, 4, 8).transpose(1, 2)  # HF's [B, S, H, D] buffer viewed [B, H, S, D]
    same = torch.empty_like(q).copy_(q)
    assert kernels.strided_like_q(same, q) is same  # already right: no copy
    for x in (q.contiguous(), q.contiguous().transpose(2, 3).contiguous().transpose(2, 3)):
        y = kernels.strided_like_q(x, q)
        assert y.stride() == q.stride() and torch.equal(y, x)
    q_group = q[:, 1:3]  # one head group of it: not dense, the strides still follow q
    y = kernels.strided_like_q(q_group.contiguous(), q_group)
    assert y.stride() == q_group.stride() and torch.equal(y, q_group)
    wide = torch.randn(1, 10, 4, 16).transpose(1, 2)  # v's head_dim 16, not q's 8: one fixed layout
    assert kernels.strided_like_q(wide, q).is_contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_backward_right_whatever_output_layouts_come_in_one_process():
    # The failure this guards against: one backward with contiguous O/dO caches a cuDNN graph, and a later
    # backward with the same q/k/v but [B, S, H, D]-strided O/dO replays it (0.5 relative gradient error).
    kernel = get_kernel("cudnn")
    g = torch.Generator(device="cuda").manual_seed(0)

    def bshd(h):  # a length used by no other test, so that this test builds the cached graph itself
        return torch.randn(1, 1234, h, 64, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k, v, dout = bshd(8), bshd(2), bshd(2), bshd(8)
    ref = get_kernel("reference")
    r_out, r_lse = ref.forward(q.float(), k.float(), v.float(), True, 0.125)
    r_grads = ref.backward(dout.float(), q.float(), k.float(), v.float(), r_out, r_lse, True, 0.125)
    out, lse = kernel.forward(q, k, v, True, 0.125)
    for o, do in ((out.contiguous(), dout.contiguous()), (out, dout), (out.contiguous(), dout)):
        for name, got, want in zip(("dq", "dk", "dv"), kernel.backward(do, q, k, v, o, lse, True, 0.125), r_grads):
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 2e-2, f"{name}: relative error {err:.2e} with O strides {o.stride()}"
