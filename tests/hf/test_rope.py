"""Scaled RoPE under sequence parallelism. transformers picks dynamic-NTK and LongRoPE frequencies in every forward
from max(position_ids) + 1; a rank holds only its shard's positions, yet it must rotate with the whole sequence's
frequencies, as the one-process model does. Loss and every gradient must equal the one-process model's for every
scaling type; the startup self-check must see a rank that rotates with its own shard's frequencies."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed
from easy_context.hf import attention as hf
from easy_context.hf.attention import use_sequence_parallel_attention
from easy_context.hf.rope import follow_sequence_length
from easy_context.hf.self_check import self_check_config
from tests.helpers.reference import rel_err
from tests.hf.test_attention import TOL, _reference, _sp_loss
from tests.helpers.tiny_models import batch, tiny_model

ORIGINAL = 64  # the context the RoPE was made for; the sequences below are longer
SEQ = 128
HALF_DIM = 8  # head_dim 16 / 2 frequencies
ROPES = {
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "longrope": dict(rope_type="longrope", factor=2.0, original_max_position_embeddings=ORIGINAL,
                     short_factor=[1.0 + 0.1 * i for i in range(HALF_DIM)],
                     long_factor=[1.0 + 2.0 * i for i in range(HALF_DIM)]),
    "yarn": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL),
    "linear": dict(rope_type="linear", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL),
}
BACKENDS = ("zigzag_ring", "ulysses")


def rope_overrides(kind: str) -> dict:
    """tiny_model overrides for a Llama whose RoPE of ``kind`` was made for ORIGINAL positions (dynamic NTK
    scales beyond max_position_embeddings; the others are set up as models.apply_rope does: limit raised to SEQ)."""
    limit = ORIGINAL if kind == "dynamic" else SEQ
    return dict(max_position_embeddings=limit, rope_parameters={**ROPES[kind], "rope_theta": 10000.0})


def _rope_worker(rank, world, seed):
    ids, labels = batch(seed, 2, SEQ)
    failures = []
    for kind in ROPES:
        ref_loss, ref_grads = _reference("llama", seed, ids, labels, **rope_overrides(kind))
        for backend in BACKENDS:
            model, out = _sp_loss(backend, None, "llama", seed, ids, labels, overrides=rope_overrides(kind),
                                  grad_reduction="sum")
            errs = {"loss": rel_err(out.value, ref_loss)}
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad)  # "sum" convention: the group's summed gradients are the exact ones
                errs[n] = rel_err(p.grad, ref_grads[n])
            worst = max(errs, key=errs.get)
            if errs[worst] > TOL:
                failures.append(f"{kind}/{backend}: {worst} off by {errs[worst]:.1e} (loss {errs['loss']:.1e})")
    assert not failures, "\n".join(failures)


def test_scaled_rope_loss_and_gradients_equal_single_process(seed):
    run_distributed(_rope_worker, 2, seed)


def _probe_worker(rank, world, seed):
    cases = [("dynamic", "zigzag_ring"), ("longrope", "ulysses"), ("yarn", "zigzag_ring")]
    for kind, backend in cases:
        config = tiny_model("llama", seed, **rope_overrides(kind)).config
        errs = self_check_config(config, backend, train_len=SEQ)
        assert max(errs.values()) < 1e-4, (kind, backend, errs)
    # Each rank rotating with its own shard's frequencies (the bug) must fail the probe at the training length.
    fixed = hf._group_max_position
    hf._group_max_position = lambda config: (lambda local: local)
    try:
        for kind, backend in cases[:2]:
            config = tiny_model("llama", seed, **rope_overrides(kind)).config
            with pytest.raises(RuntimeError, match="differs from full-sequence sdpa"):
                self_check_config(config, backend, train_len=SEQ)
    finally:
        hf._group_max_position = fixed


def test_self_check_probe_reaches_the_training_length(seed):
    run_distributed(_probe_worker, 2, seed)


def test_length_dependent_rope_that_cannot_follow_the_sequence_is_refused():
    class OwnDynamicRope(torch.nn.Module):  # picks its frequencies from the shard, not via dynamic_rope_update
        rope_type = "dynamic"

        def forward(self, x, position_ids):
            raise AssertionError("never called")

    model = tiny_model("llama", 0, **rope_overrides("dynamic"))
    model.model.rotary_emb = OwnDynamicRope()
    with pytest.raises(ValueError, match="dynamic_rope_update"):
        use_sequence_parallel_attention("zigzag_ring", model)
    model = tiny_model("llama", 0, **rope_overrides("longrope"))
    assert use_sequence_parallel_attention("zigzag_ring", model) is model  # transformers' own: followed


def test_a_decorator_above_dynamic_rope_update_still_lets_the_rope_follow_the_sequence():
    # transformers 5.17 puts torch.no_grad() above dynamic_rope_update on the rotary forward; 5.24 does not.
    model = tiny_model("llama", 0, **rope_overrides("dynamic"))
    rope = model.model.rotary_emb
    rope.__class__ = type("NoGradAbove", (type(rope),), {"forward": torch.no_grad()(type(rope).forward)})
    assert follow_sequence_length(model, lambda local: local + SEQ) == 1
    x, shard = torch.zeros(1, 4, 16), torch.arange(4)[None]
    cos, _ = rope(x, shard)  # frequencies of the whole sequence's reach (SEQ + 4 positions), not the shard's 4
    fresh = lambda: tiny_model("llama", 0, **rope_overrides("dynamic")).model.rotary_emb  # noqa: E731
    whole, _ = fresh()(x, torch.arange(SEQ + 4)[None])
    own, _ = fresh()(x, shard)
    assert torch.allclose(cos, whole[:, :4]) and not torch.allclose(cos, own)
