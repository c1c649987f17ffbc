"""Chunked cross entropy equals the plain one (loss and gradients) without ever holding [N, V] logits;
the sequence-parallel loss is the exact global token mean with the documented gradient convention."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed
from tests.helpers.dispatch import MATMULS, OpCounter
from easy_context.attention.layouts import shard
from easy_context.parallel.loss import chunked_cross_entropy, sequence_parallel_cross_entropy
from tests.helpers.memory import LargestAllocation
from tests.helpers.reference import rel_err


def _problem(seed, n, h, v, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    labels = torch.randint(v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, b, labels


def _plain(hidden, weight, bias, labels, softcap, reduction):
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_chunked_equals_plain_cross_entropy(seed, softcap, bias, reduction):
    hidden, weight, b, labels = _problem(seed, 53, 12, 37, bias=bias)
    params = [hidden, weight] + ([b] if bias else [])
    weights = torch.randn(53, dtype=torch.float64)  # a non-uniform upstream gradient for "none"
    for chunk in (1, 8, 53, 100):  # one row, uneven last chunk, exact, larger than N
        got = chunked_cross_entropy(hidden, weight, labels, bias=b, chunk_size=chunk, softcap=softcap,
                                    reduction=reduction)
        ref = _plain(hidden, weight, b, labels, softcap, reduction)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        if reduction == "none":
            got, ref = (got * weights).sum(), (ref * weights).sum()
        assert rel_err(got, ref) < 1e-12, chunk
        for x, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
            assert rel_err(x, r) < 1e-12, chunk


def test_shapes_and_all_ignored(seed):
    hidden, weight, _, labels = _problem(seed, 24, 8, 16)
    h3, l2 = hidden.view(2, 12, 8), labels.view(2, 12)
    per_token = chunked_cross_entropy(h3, weight, l2, chunk_size=5, reduction="none")
    assert per_token.shape == (2, 12) and (per_token[l2 == -100] == 0).all()
    none = torch.full_like(labels, -100)
    loss = chunked_cross_entropy(hidden, weight, none, reduction="mean")
    assert loss.item() == 0.0  # not NaN: a batch with no targets contributes nothing
    loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_float32_matches_and_frozen_weight(seed):
    hidden, weight, _, labels = _problem(seed, 40, 16, 64, dtype=torch.float32)
    weight.requires_grad_(False)  # e.g. a frozen head: no weight gradient is computed
    got = chunked_cross_entropy(hidden, weight, labels, chunk_size=7, reduction="mean")
    ref = _plain(hidden, weight, None, labels, None, "mean")
    assert rel_err(got, ref) < 1e-6
    (g,), (r,) = torch.autograd.grad(got, [hidden]), torch.autograd.grad(ref, [hidden])
    assert rel_err(g, r) < 1e-5


def test_bad_inputs_raise():
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(h, torch.randn(16, 7), y)
    with pytest.raises(ValueError, match="leading dims"):
        chunked_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match=r"in \[0, 16\)"):
        chunked_cross_entropy(h, w, torch.tensor([0, 1, 16, -100]))
    with pytest.raises(ValueError, match="integer class ids"):
        chunked_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="grad_reduction"):
        sequence_parallel_cross_entropy(h, w, y, grad_reduction="avg")


def test_memory_is_chunk_by_vocab_not_sequence_by_vocab(seed):
    n, h, v, chunk = 4096, 16, 1024, 128
    hidden, weight, _, labels = _problem(seed, n, h, v, dtype=torch.float32)
    with LargestAllocation() as rec:
        chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    assert rec.numel <= chunk * v, f"{rec.op} allocated {rec.numel} elements > chunk x V = {chunk * v}"
    with LargestAllocation() as naive:  # control: the plain loss materializes all N x V logits
        _plain(hidden, weight, None, labels, None, "sum").backward()
    assert naive.numel >= n * v >= 32 * rec.numel


def test_a_training_loss_takes_three_matmuls_per_chunk_all_in_forward(seed):
    hidden, weight, _, labels = _problem(seed, 40, 8, 32, dtype=torch.float32)
    chunks = 5  # 40 rows, chunk_size 8
    with OpCounter(MATMULS) as fwd:
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="mean")
    with OpCounter(MATMULS) as bwd:
        loss.backward()
    # logits, then their gradient's two products (hidden, weight); the logits are never recomputed
    assert (fwd.count, bwd.count) == (3 * chunks, 0)


def test_each_chunks_weight_gradient_is_added_inside_its_matmul(seed):
    hidden, weight, _, labels = _problem(seed, 40, 8, 32, dtype=torch.float32)
    with OpCounter(["add", "add_"]) as rec:
        chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="mean")
    assert not [op for op in rec.seen if tuple(weight.shape) in op.shapes], rec.seen  # no [V, H] product to add


def test_without_gradients_the_loss_computes_only_the_logits(seed):
    hidden, weight, _, labels = _problem(seed, 40, 8, 32, dtype=torch.float32)
    with OpCounter(MATMULS) as rec, torch.no_grad():
        chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="sum")
    assert rec.count == 5


def test_per_token_losses_recompute_the_logits_in_backward(seed):
    hidden, weight, _, labels = _problem(seed, 40, 8, 32, dtype=torch.float32)
    with OpCounter(MATMULS) as fwd:
        losses = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="none")
    with OpCounter(MATMULS) as bwd:
        (losses * torch.rand(40)).sum().backward()  # any upstream weights per token: known only in backward
    assert (fwd.count, bwd.count) == (5, 3 * 5)


def test_a_second_backward_through_a_training_loss_is_refused(seed):
    hidden, weight, _, labels = _problem(seed, 16, 8, 32)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="computed in forward"):
        loss.backward()


def test_float16_weight_gradient_is_scaled_before_its_cast(seed):
    # 4096 tokens of one label: the unscaled weight gradient of label 0 (~ -4096 x 0.5 x 40) overflows float16,
    # its token mean does not
    n, h, v = 4096, 8, 16
    g = torch.Generator().manual_seed(seed)
    hidden = (40 + torch.rand(n, h, generator=g)).half().requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / 100).half().requires_grad_(True)
    labels = torch.zeros(n, dtype=torch.long)
    chunked_cross_entropy(hidden, weight, labels, chunk_size=512, reduction="mean").backward()
    ref = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    _plain(*ref[:2], None, labels, None, "mean").backward()
    assert torch.isfinite(weight.grad).all() and ref[1].grad.abs().max() > 1
    assert rel_err(weight.grad.double(), ref[1].grad) < 1e-2
    assert rel_err(hidden.grad.double(), ref[0].grad) < 5e-2  # ~1e-6 each: float16 subnormals, 2-3 digits


def _sp_worker(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    b, s, h, v = 2, 8 * world, 8, 32
    hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(v, (b, s), generator=g)
    labels[:, : s // 2] = -100  # rank 0 (and rank 1 of 4) hold no target at all
    ref = F.cross_entropy((hidden @ weight.T).view(-1, v), labels.view(-1))
    ref_dh, ref_dw = torch.autograd.grad(ref, [hidden, weight])
    for layout in ("contiguous", "zigzag"):
        mine = shard(hidden.detach(), layout, rank, world).requires_grad_(True)
        out = sequence_parallel_cross_entropy(mine, weight, shard(labels, layout, rank, world), grad_reduction="sum",
                                              chunk_size=3)
        assert out.num_tokens == int((labels != -100).sum())
        assert rel_err(out.value, ref) < 1e-12  # the exact global mean, on every rank
        out.loss.backward()
        assert rel_err(mine.grad, shard(ref_dh, layout, rank, world)) < 1e-12
        dw = weight.grad.clone()
        dist.all_reduce(dw)  # "sum": the SP group's gradients add up to the exact one
        assert rel_err(dw, ref_dw) < 1e-12
        weight.grad = None
        scaled = sequence_parallel_cross_entropy(mine, weight, shard(labels, layout, rank, world), chunk_size=3)
        assert torch.equal(scaled.loss.detach(), out.loss.detach() * world)  # "mean": averaging cancels it
        assert torch.equal(scaled.value, out.value)


def test_sequence_parallel_loss_is_exact_global_mean(seed):
    run_distributed(_sp_worker, 4, seed)
