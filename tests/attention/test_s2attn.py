"""S²-Attn (LongLoRA shifted sparse attention): equals an explicit per-group-mask reference in output and
gradients, is causal (the paper's roll-with-wrap version is shown to fail the same check), is exact when
sequence-parallel with a halo exchange, runs S²-Attn in training and full attention in eval inside a
Hugging Face model, and rejects what it cannot honour."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed
from easy_context.hf.causal_lm import causal_lm_loss
from easy_context.hf.self_check import self_check
from easy_context.parallel.inputs import prepare_seq_parallel_inputs
from easy_context.attention.layouts import shard
from easy_context.attention.s2attn import s2_attention
from easy_context.hf.s2attn import apply_s2attn, register_s2attn
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model

TOL = 1e-10  # float64, relative


def group_ids(heads: int, seq: int, size: int) -> torch.Tensor:
    """[H, S] group of each token: the first half of the heads in groups of ``size``, the second half in
    groups shifted by size/2 (first and last ones half-sized, no wrap-around)."""
    i = torch.arange(seq)
    return torch.stack([i // size if h < heads // 2 else (i + size // 2) // size for h in range(heads)])


def masked_attention(q, k, v, allowed):
    """out, lse of softmax attention with an explicit [H, S, S] boolean mask of allowed (query, key) pairs."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def reference_s2(q, k, v, size):
    """S²-Attn the plain way: causal and same-group, per head."""
    gid = group_ids(q.shape[1], q.shape[2], size)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return masked_attention(q, k, v, causal & (gid[:, :, None] == gid[:, None, :]))


def rolled_s2(q, k, v, size):
    """The LongLoRA paper's pseudocode: roll the shifted heads by -size/2, attend in groups, roll back.
    It wraps around, so the first tokens of the shifted heads see the last ones (the counterexample)."""
    h, shift = q.shape[1] // 2, size // 2
    hk = k.shape[1] // 2
    plain = reference_s2_unshifted(q[:, :h], k[:, :hk], v[:, :hk], size)
    rolled = reference_s2_unshifted(*(x.roll(-shift, 2) for x in (q[:, h:], k[:, hk:], v[:, hk:])), size)
    return torch.cat([plain, rolled.roll(shift, 2)], 1)


def reference_s2_unshifted(q, k, v, size):
    i = torch.arange(q.shape[2])
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] // size == i[None, :] // size)
    return masked_attention(q, k, v, allowed)[0]


def _inputs(seed, b, h, hk, s, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g, dtype=dtype) for n in (h, hk, hk, h)]  # q, k, v, dout


def _grads(fn, q, k, v, dout):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


CASES = [  # heads, kv_heads, seq, group_size (None: a quarter of the sequence)
    (4, 2, 32, None), (4, 4, 32, 8), (4, 1, 32, 16),  # GQA, MHA, MQA (kv heads straddle the halves)
    (6, 3, 24, 24), (2, 2, 16, 2),  # one group (shifted heads: two half-groups), groups of 2
]


@pytest.mark.parametrize("heads, kv_heads, seq, size", CASES)
def test_equals_masked_reference(heads, kv_heads, seq, size, seed):
    q, k, v, dout = _inputs(seed, 2, heads, kv_heads, seq)
    g = size or seq // 4
    ours = _grads(lambda *x: s2_attention(*x, group_size=size, return_lse=True), q, k, v, dout)
    ref = _grads(lambda *x: reference_s2(*x, g), q, k, v, dout)
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        assert x.shape == r.shape and rel_err(x, r) < TOL, f"{name}: {rel_err(x, r):.1e}"
    # Not full attention: the reference's groups really cut attention.
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv_heads, 1),
                                                            v.repeat_interleave(heads // kv_heads, 1), is_causal=True)
    assert rel_err(ours[0], full) > 1e-3


def _changes_the_past(attn, seq: int, seed: int) -> bool:
    """Does changing the last token's q/k/v change the output at any earlier position?"""
    q, k, v, _ = _inputs(seed, 1, 4, 2, seq)
    before = attn(q, k, v)
    for x in (q, k, v):
        x[:, :, -1] += 10.0
    after = attn(q, k, v)
    return not torch.equal(before[:, :, :-1], after[:, :, :-1])


def test_causal_unlike_the_rolled_version(seed):
    assert not _changes_the_past(lambda q, k, v: s2_attention(q, k, v), 32, seed)
    assert not _changes_the_past(lambda q, k, v: reference_s2(q, k, v, 8)[0], 32, seed)
    # The check can fail: the paper's roll lets the shifted heads' first tokens see the last ones.
    assert _changes_the_past(lambda q, k, v: rolled_s2(q, k, v, 8), 32, seed)
    # ... and the rolled version equals ours except for that wrap-around group.
    q, k, v, _ = _inputs(seed, 1, 4, 2, 32)
    diff = (rolled_s2(q, k, v, 8) - s2_attention(q, k, v)).abs().amax(dim=(0, 3))  # [H, S]
    assert diff[:2].max() < 1e-12 and diff[2:, 4:].max() < 1e-12 and diff[2:, :4].min() > 1e-6


def test_rejects_what_it_cannot_honour():
    q = torch.randn(1, 4, 32, 8)
    for kwargs, match in [(dict(group_size=12), "not a multiple"), (dict(group_size=7), "even group size"),
                          (dict(ratio=0.3), "even group size|not a multiple"), (dict(ratio=1.5), "ratio"),
                          (dict(causal=False), "causal=False")]:
        with pytest.raises(ValueError, match=match):
            s2_attention(q, q[:, :2], q[:, :2], **kwargs)
    with pytest.raises(ValueError, match="head count must be even"):
        s2_attention(q[:, :3], q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="even group size"):
        register_s2attn(group_size=5)
    with pytest.raises(ValueError, match="bf16"):
        s2_attention(q.bfloat16(), q[:, :2].bfloat16(), q[:, :2].bfloat16())  # CPU kernels: float32/64


# ---------------------------------------------------------------- Hugging Face models

REFERENCE_NAME = "test_s2_reference"


def _register_reference(size: int) -> str:
    """A transformers attention implementation computing ``reference_s2`` in float64 (whatever the mode)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        assert scaling == query.shape[-1] ** -0.5
        out = reference_s2(query.double(), key.double(), value.double(), size)[0]
        return out.to(query.dtype).transpose(1, 2), None

    AttentionInterface.register(REFERENCE_NAME, attention)
    AttentionMaskInterface.register(REFERENCE_NAME, lambda *args, **kwargs: None)
    return REFERENCE_NAME


def test_hf_model_trains_with_s2_and_evaluates_with_full_attention(seed):
    ids, labels = batch(seed, 2, 64)
    model = apply_s2attn(tiny_model("llama", seed), group_size=16)
    assert model.config._attn_implementation == "easy_context_s2attn"
    ref = tiny_model("llama", seed)
    ref.set_attn_implementation(_register_reference(16))
    sdpa = tiny_model("llama", seed)
    model.train()
    assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
    assert rel_err(model(input_ids=ids).logits, sdpa(input_ids=ids).logits) > 1e-3
    model.eval()  # full attention at evaluation
    assert rel_err(model(input_ids=ids).logits, sdpa(input_ids=ids).logits) < 1e-5
    self_check(model)  # the eval path matches full-sequence sdpa

    # A short training run (gradient checkpointing on, as for long sequences): the loss goes down.
    model.train()
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


# ---------------------------------------------------------------- sequence parallel (contiguous shards)

SP_CASES = [(4, 2, 16, 8), (4, 1, 16, 16), (2, 2, 8, 4)]  # heads, kv_heads, local length, group size


def _check_sp_attention(rank, world, seed):
    for heads, kv_heads, local, size in SP_CASES:
        _check_sp_case(rank, world, seed, heads, kv_heads, local, size)
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="whole number of groups"):  # S = 24 is 2 groups of 12; shards are 8
        s2_attention(q, q, q, group_size=12)


def _check_sp_model(rank, world, seed):
    seq, size = 16 * world, 8
    ids, labels = batch(seed, 2, seq)
    ref = tiny_model("llama", seed)
    ref.set_attn_implementation(_register_reference(size))
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    model = apply_s2attn(tiny_model("llama", seed), group_size=size)
    model.train()
    inp = prepare_seq_parallel_inputs("ring", ids, labels)  # contiguous layout
    out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, grad_reduction="sum")
    out.loss.backward()
    assert rel_err(out.value, ref_loss) < 1e-5
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        dist.all_reduce(p.grad)
        assert rel_err(p.grad, r.grad) < 1e-5, n
    self_check(model)  # eval mode: exact ring attention over the shards


def _sp_worker(rank, world, seed):
    _check_sp_attention(rank, world, seed)
    _check_sp_model(rank, world, seed)


def test_sequence_parallel_equals_reference(seed):
    run_distributed(_sp_worker, 3, seed)  # 3 ranks: a middle rank both sends and receives a halo


def _check_sp_case(rank, world, seed, heads, kv_heads, local, size):
    q, k, v, dout = _inputs(seed, 2, heads, kv_heads, local * world)
    ref = _grads(lambda *x: reference_s2(*x, size), q, k, v, dout)

    def sp(q_, k_, v_):
        return s2_attention(q_, k_, v_, group_size=size, return_lse=True)

    ours = _grads(sp, *(shard(x, "contiguous", rank, world, dim=2) for x in (q, k, v, dout)))
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        err = rel_err(x, shard(r, "contiguous", rank, world, dim=2))
        assert err < TOL, f"rank {rank}/{world} {heads}/{kv_heads} heads G={size}: {name} off by {err:.1e}"


def _rank_local_error_worker(rank, world, seed):
    # Shapes agree across ranks but one rank's options fail its own checks (a different rank each time, the
    # middle one included): every rank raises that error instead of waiting for the halo it never sends.
    q = torch.randn(1, 4, 8, 8)  # 3 ranks: a sequence of 24, shards of 8
    cases = [(dict(group_size=7), "even group size"), (dict(group_size=12), "whole number of groups"),
             (dict(ratio=1.5), "ratio"), (dict(ratio=0.125), "even group size"),
             (dict(causal=False), "causal=False")]
    for i, (bad_kwargs, match) in enumerate(cases):
        kwargs = bad_kwargs if rank == i % world else dict(group_size=8)
        with pytest.raises(ValueError, match=match):
            s2_attention(q, q[:, :2], q[:, :2], **kwargs)
    _check_sp_case(rank, world, seed, 4, 2, 16, 8)  # the group is still in step: a correct call is exact


def test_rank_local_errors_raise_on_every_rank(seed):
    run_distributed(_rank_local_error_worker, 3, seed, timeout_s=20)
