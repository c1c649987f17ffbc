"""``fused=True``: the chunked loss's softmax, losses and logit gradient come from torch.compile'd kernels, and
the loss and its gradients are those of the plain cross entropy (float64), and of the eager chunks under bf16
autocast up to float32 rounding order."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from easy_context.parallel.loss import chunked_cross_entropy
from tests.helpers.reference import rel_err
from tests.parallel.test_loss import _plain, _problem


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()  # every test compiles its own variants, within the recompile limit
    counters.clear()
    yield
    torch._dynamo.reset()


def _eager_and_fused(hidden, weight, labels, chunk_size: int) -> list[tuple]:
    """(loss, d hidden, d weight) of the mean loss under bf16 autocast, eager chunks then fused."""
    results = []
    for fused in (False, True):
        h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk_size, reduction="mean", fused=fused)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("softcap,bias,reduction", [(None, False, "mean"), (2.5, True, "sum"), (None, True, "none"),
                                                    (2.5, False, "none")])
def test_fused_equals_plain_cross_entropy(seed, softcap, bias, reduction):
    hidden, weight, b, labels = _problem(seed, 53, 12, 37, bias=bias)
    params = [hidden, weight] + ([b] if bias else [])
    weights = torch.randn(53, dtype=torch.float64)  # a non-uniform upstream gradient for "none"
    got = chunked_cross_entropy(hidden, weight, labels, bias=b, chunk_size=16, softcap=softcap,
                                reduction=reduction, fused=True)  # 16, 16, 16, 5 rows
    ref = _plain(hidden, weight, b, labels, softcap, reduction)
    if reduction == "none":
        assert (got[labels == -100] == 0).all()
        got, ref = (got * weights).sum(), (ref * weights).sum()
    assert rel_err(got, ref) < 1e-12
    for x, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        assert rel_err(x, r) < 1e-12
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # it did run compiled


def test_fused_equals_eager_chunks_under_bf16_autocast(seed):
    hidden, weight, _, labels = _problem(seed, 96, 48, 200, dtype=torch.float32)
    (loss, dh, dw), (fused_loss, fused_dh, fused_dw) = _eager_and_fused(hidden, weight, labels, chunk_size=32)
    assert fused_loss.dtype == torch.float32 and fused_dw.dtype == torch.float32
    assert rel_err(fused_loss, loss) < 1e-6
    # the bf16 logit gradient can round the other way where float32 sums differ in their last bit
    assert rel_err(fused_dh, dh) < 1e-4 and rel_err(fused_dw, dw) < 1e-4


def test_fused_loss_without_gradients_is_the_eager_one(seed):
    hidden, weight, _, labels = _problem(seed, 40, 16, 64, dtype=torch.float32)
    with torch.no_grad():
        eager = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="none")
        fused = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="none", fused=True)
    assert rel_err(fused, eager) < 1e-6 and (fused[labels == -100] == 0).all()


@pytest.mark.gpu
def test_fused_equals_eager_on_cuda_at_a_real_vocabulary(seed):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(4096, 1024, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(32000, 1024, device="cuda", generator=g) / 32).requires_grad_()
    labels = torch.randint(32000, (4096,), device="cuda", generator=g)
    (loss, dh, dw), (fused_loss, fused_dh, fused_dw) = _eager_and_fused(hidden, weight, labels, chunk_size=1024)
    assert rel_err(fused_loss, loss) < 1e-6
    assert rel_err(fused_dh, dh) < 1e-3 and rel_err(fused_dw, dw) < 1e-3
