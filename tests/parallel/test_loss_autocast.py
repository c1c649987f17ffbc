"""The chunked loss under autocast (float32 master weights, bf16 compute: the DDP path) computes as a bf16 linear
layer would, in backward too: its matmuls take the autocast dtype, while the softmax and sums stay float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easy_context.parallel.loss import chunked_cross_entropy
from tests.helpers.dispatch import MATMULS, OpCounter
from tests.helpers.memory import LivePeak

def _inputs(seed: int, n: int = 96, hidden: int = 48, vocab: int = 200):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    labels = torch.randint(vocab, (n,), generator=g)
    labels[:7] = -100
    return h, w, labels


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients taken in forward; recomputed in backward
def test_every_matmul_runs_in_the_autocast_dtype_gradients_included(seed, reduction):
    h, w, labels = _inputs(seed)
    h.requires_grad_()
    w.requires_grad_()
    with OpCounter(MATMULS) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, w, labels, chunk_size=32, reduction=reduction).sum()
        loss.backward()  # outside autocast, as a training loop calls it
    assert rec.seen and all(op.dtypes == (torch.bfloat16,) * len(op.dtypes) for op in rec.seen), rec.seen
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


def _bf16_linear_reference(h, w, labels) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The plain reference: F.linear under bf16 autocast, then float32 cross entropy; (loss, [d h, d w])."""
    ref = [t.detach().clone().requires_grad_() for t in (h, w)]
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        logits = F.linear(*ref)
    want = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    want.backward()
    return want, [t.grad for t in ref]


def test_under_autocast_it_equals_a_bf16_linear_and_float32_cross_entropy(seed):
    h, w, labels = _inputs(seed)
    mine = [t.clone().requires_grad_() for t in (h, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(*mine, labels, chunk_size=32, reduction="mean")
    loss.backward()
    want, grads = _bf16_linear_reference(h, w, labels)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 softmax
    for got, exp in zip(mine, grads):  # bf16 products and sums in another order: bf16 rounding
        torch.testing.assert_close(got.grad, exp, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_float32_weight_is_cast_once_per_pass_not_once_per_chunk(seed, reduction):
    h, w, labels = _inputs(seed)  # 96 rows: 6 chunks of 16
    h.requires_grad_()
    w.requires_grad_()
    with OpCounter(["_to_copy"]) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, w, labels, chunk_size=16, reduction=reduction).sum()
        loss.backward()
    weight_sized = [op for op in rec.seen if op.shapes[0] in (tuple(w.shape), tuple(w.t().shape))]
    assert len(weight_sized) == (1 if reduction == "mean" else 2), weight_sized  # "none" recomputes in backward


def test_a_chunks_float32_logits_are_freed_before_its_weight_gradient_product(seed):
    # a large vocabulary and a small width: the float32 chunk of logits (16 x 4096 x 4 bytes) is the largest tensor
    h, _, labels = _inputs(seed, n=64, hidden=8, vocab=4096)
    w = torch.randn(4096, 8, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    h.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), LivePeak() as rec:
        chunked_cross_entropy(h, w, labels, chunk_size=16, reduction="mean")
    chunk = 16 * 4096
    # the accumulators (weight gradient in float32, its bf16 copy to multiply with) and at most the float32 chunk
    # with its bf16 copy at once: not two float32 chunks, not a float32 chunk beside the [V, H] product
    held = w.numel() * (4 + 2) + h.numel() * 4
    assert rec.peak <= held + chunk * (4 + 2) + 4096, (rec.peak, held, chunk)  # + a few [n] vectors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])  # DDP (autocast), ZeRO-3 (bf16 weights)
def test_on_cuda_it_equals_the_reference_and_holds_one_chunk_of_logits(weight_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vocab, chunk = 8192, 512, 32000, 1024
    h = torch.randn(n, hidden, device="cuda", generator=g, dtype=weight_dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5).to(weight_dtype).requires_grad_()
    labels = torch.randint(vocab, (n,), device="cuda", generator=g)
    labels[:100] = -100
    h[:2].bfloat16() @ w[:2].bfloat16().t()  # cuBLAS takes its workspace (32 MiB on Hopper) from the allocator once
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk, reduction="mean")
    peak = torch.cuda.max_memory_allocated() - before
    # kept for backward: the float32 weight gradient and the hidden one; passing: the bf16 weight, one float32
    # chunk of logits beside its bf16 copy
    kept = vocab * hidden * 4 + h.numel() * h.element_size()
    assert peak <= kept + vocab * hidden * 2 + chunk * vocab * (4 + 2) + 2 ** 23, (peak, kept)
    loss.backward()
    want, grads = _bf16_linear_reference(h, w, labels)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    for got, exp in zip((h.grad, w.grad), grads):
        torch.testing.assert_close(got.float(), exp.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8, reason="needs sm80+")
def test_on_cuda_logits_and_weight_gradient_leave_the_gemm_in_float32():
    n, hidden, vocab, chunk = 2048, 256, 8192, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5).requires_grad_()
    labels = torch.randint(vocab, (n,), device="cuda", generator=g)
    with OpCounter(["add", "add_", "_to_copy", "copy_"]) as rec, torch.autocast("cuda", dtype=torch.bfloat16):
        chunked_cross_entropy(h, w, labels, chunk_size=chunk, reduction="mean")
    added = [op for op in rec.seen if op.name.startswith("add") and (vocab, hidden) in op.shapes]
    cast = [op for op in rec.seen if "copy" in op.name and (chunk, vocab) in op.shapes]
    assert not added, added  # no [V, H] product added to the float32 weight gradient
    assert not cast, cast  # no [chunk, V] logits or logit gradient cast on its own
