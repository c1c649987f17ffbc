"""cepe/distill.py: the teacher keeps its top-k next-token probabilities; the student's KL over those k tokens plus
a rest-of-mass bucket (or without it) equals the value computed by hand, and its chunked gradient equals
autograd's through the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from easy_context.cepe.distill import teacher_topk, topk_kl, window_topk
from tests.helpers.tiny_models import tiny_model

# logits [2, 1, 0, -1] for one position: hidden [1] through a head whose rows are those numbers
HIDDEN = torch.tensor([[1.0]], dtype=torch.float64)
HEAD = torch.tensor([[2.0], [1.0], [0.0], [-1.0]], dtype=torch.float64)
TEACHER_P = torch.tensor([[0.5, 0.3]], dtype=torch.float64)  # on tokens 1 and 0; the other 0.2 is the rest
TEACHER_IDS = torch.tensor([[1, 0]])


def by_hand(rest: bool) -> float:
    z = [2.0, 1.0, 0.0, -1.0]
    total = sum(math.exp(x) for x in z)
    q = [math.exp(x) / total for x in z]
    kl = 0.5 * math.log(0.5 / q[1]) + 0.3 * math.log(0.3 / q[0])
    return kl + (0.2 * math.log(0.2 / (q[2] + q[3])) if rest else 0.0)


@pytest.mark.parametrize("rest", ["bucket", "drop"])
def test_kl_equals_the_hand_computed_value(rest):
    kl = topk_kl(HIDDEN, HEAD, TEACHER_P, TEACHER_IDS, rest=rest)
    assert kl.shape == (1,)
    assert abs(kl.item() - by_hand(rest == "bucket")) < 1e-12


@pytest.mark.parametrize("rest", ["bucket", "drop"])
def test_chunked_kl_and_its_gradients_equal_autograd_through_full_logits(seed, rest):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    head = torch.randn(13, 5, generator=g, dtype=torch.float64)
    probs, ids = teacher_topk(torch.randn(2, 7, 5, generator=g, dtype=torch.float64), head, 4)
    probs = probs.double()
    a = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
    got = topk_kl(*a, probs, ids, rest=rest, chunk_size=3)
    b = [hidden.clone().requires_grad_(), head.clone().requires_grad_()]
    log_q = torch.log_softmax(b[0] @ b[1].t(), dim=-1)
    top = log_q.gather(-1, ids)
    want = (probs * (probs.log() - top)).sum(-1)
    if rest == "bucket":
        p_rest, q_rest = 1 - probs.sum(-1), 1 - top.exp().sum(-1)
        want = want + p_rest * (p_rest.log() - q_rest.log())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(2, 7, generator=g, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(got, a, dout), torch.autograd.grad(want, b, dout)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_teacher_topk_keeps_the_k_largest_probabilities_in_order():
    probs, ids = teacher_topk(HIDDEN, HEAD, 3)
    full = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), 0)
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(probs[0].double(), full[:3], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="top-k must be in \\[1, vocab size 4\\]"):
        teacher_topk(HIDDEN, HEAD, 5)


def test_the_teacher_pass_labels_the_window_from_the_whole_sequence():
    model = tiny_model("llama", 0).eval()
    ids = torch.randint(128, (2, 20), generator=torch.Generator().manual_seed(0))
    probs, top = window_topk(model, ids, 6, k=5)
    logits = model(input_ids=ids).logits[:, -6:]
    want = torch.softmax(logits.float(), -1).topk(5, dim=-1)
    torch.testing.assert_close(probs, want.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(top, want.indices)


def test_teacher_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="teacher's vocabulary differs"):
        topk_kl(HIDDEN, HEAD, TEACHER_P, torch.tensor([[1, 9]]))
    with pytest.raises(ValueError, match="must be \\[..., k\\] at the student's positions"):
        topk_kl(HIDDEN, HEAD, TEACHER_P[:, :1], TEACHER_IDS)
