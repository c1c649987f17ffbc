"""Block kernels: outputs strided like the query, cuDNN's backward right whatever output layouts come in, GQA's k/v
heads passed to cuDNN as they are, one query over one key (which cuDNN rejects) answered exactly."""

from __future__ import annotations

import pytest
import torch

from easy_context import zigzag_ring_attention
from easy_context.attention import kernels
from easy_context.attention.kernels import get_kernel
from tests.helpers.dispatch import OpCounter


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


def test_cudnn_backward_of_one_query_over_one_key_is_exact_without_cudnn():
    # A one-token document gets a call of its own, and cuDNN's backward rejects s_q = s_kv = 1. There out = v, so
    # dq = dk = 0 and dv is dout summed over each kv head's group; no cuDNN op runs (this passes on a CPU).
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, 8, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = get_kernel("reference")
    for causal in (True, False):
        out, lse = ref.forward(q, k, v, causal, 0.25)
        want = ref.backward(dout, q, k, v, out, lse, causal, 0.25)
        got = get_kernel("cudnn").backward(dout, q, k, v, out, lse, causal, 0.25)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12), name


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_takes_gqa_kv_heads_as_they_are_from_torch_2_8():
    kernel = get_kernel("cudnn")
    q, k, v = (torch.randn(1, h, 512, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    out, lse = kernel.forward(q, k, v, True, 0.125)
    kernel.backward(out, q, k, v, out, lse, True, 0.125)  # builds the backward's cached state first
    ops = ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"]
    with OpCounter(ops) as rec:
        out, lse = kernel.forward(q, k, v, True, 0.125)
        dq, dk, dv = kernel.backward(out, q, k, v, out, lse, True, 0.125)
    kv_heads = 2 if torch.__version__ >= "2.8" else 8  # before 2.8: k/v repeated to q's heads
    forward, backward = rec.seen
    assert forward.shapes[1][1] == backward.shapes[2][1] == kv_heads, rec.seen
    assert dk.shape == k.shape and dv.shape == v.shape
