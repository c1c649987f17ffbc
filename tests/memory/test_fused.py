"""fused.py: the compiled RMSNorm, SwiGLU and RoPE replace exactly the ops that compute the same function, and a
model's loss and gradients with them equal those without (float32, CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from easy_context.memory.fused import apply_rope, fuse_pointwise
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model


@pytest.fixture(autouse=True)
def restore_rope(monkeypatch):
    # fuse_pointwise replaces RoPE in the modeling module, for the whole process: undo it after each test
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen3.modeling_qwen3 as qwen3

    for mod in (llama, qwen3, gemma2):
        monkeypatch.setattr(mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)


def _loss_and_grads(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3 adds RMSNorms on the query and key heads
def test_fused_model_has_the_same_loss_and_gradients(family, seed):
    ids, labels = batch(seed, 2, 29)
    ref_loss, ref_grads = _loss_and_grads(tiny_model(family, seed), ids, labels)
    model = tiny_model(family, seed)
    layers = model.config.num_hidden_layers
    norms = 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)
    assert fuse_pointwise(model) == {"rms_norm": norms, "swiglu": layers, "rope": 1}
    assert sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb is apply_rope
    loss, grads = _loss_and_grads(model, ids, labels)
    assert rel_err(loss, ref_loss) < 1e-6
    for n, g in ref_grads.items():
        assert rel_err(grads[n], g) < 1e-5, n
    assert fuse_pointwise(model) == {"rms_norm": norms, "swiglu": layers, "rope": 1}  # again: no change


def test_ops_that_compute_something_else_are_left_alone(seed):
    # Gemma 2: RMSNorm scales by (1 + weight), the MLP uses GELU; only its rotate-half RoPE is the same
    model = tiny_model("gemma2", seed, hidden_activation="gelu_pytorch_tanh", attn_implementation="eager")
    forwards = {n: m.forward for n, m in model.named_modules()}
    assert fuse_pointwise(model) == {"rms_norm": 0, "swiglu": 0, "rope": 1}
    assert all(m.forward == forwards[n] for n, m in model.named_modules())


def test_a_model_with_nothing_to_fuse_is_refused_unless_fusion_is_optional():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="leave the option off"):
        fuse_pointwise(model)
    assert fuse_pointwise(model, required=False) == {"rms_norm": 0, "swiglu": 0, "rope": 0}  # the default


def test_the_caller_random_stream_is_untouched(seed):
    model = tiny_model("llama", seed)
    torch.manual_seed(seed)
    expected = torch.rand(3)
    torch.manual_seed(seed)
    fuse_pointwise(model)
    assert torch.equal(torch.rand(3), expected)


def test_fusing_after_another_forward_wrapper_is_refused_before_anything_changes(seed):
    from easy_context.memory.tiled_mlp import apply_tiled_mlp

    model = tiny_model("llama", seed)
    apply_tiled_mlp(model, tile_tokens=8)
    with pytest.raises(ValueError, match="call fuse_pointwise first"):
        fuse_pointwise(model)
    assert not any(getattr(m, "_easy_context_fused", False) for m in model.modules())


def test_fused_then_tiled_mlp_trains_like_eager(seed):
    from easy_context.memory.tiled_mlp import apply_tiled_mlp

    ids, labels = batch(seed, 2, 29)
    ref_loss, ref_grads = _loss_and_grads(tiny_model("llama", seed), ids, labels)
    model = tiny_model("llama", seed)
    fuse_pointwise(model)
    apply_tiled_mlp(model, tile_tokens=10)
    loss, grads = _loss_and_grads(model, ids, labels)
    assert rel_err(loss, ref_loss) < 1e-6
    for n, g in ref_grads.items():
        assert rel_err(grads[n], g) < 1e-5, n


def test_rope_keeps_the_projections_memory_order_in_outputs_and_gradients(seed):
    import transformers.models.llama.modeling_llama as llama

    g = torch.Generator().manual_seed(seed)
    b, s, h, d = 2, 7, 4, 8
    # q/k as the model hands them over: [B, S, H, D] projections viewed [B, H, S, D]
    q, k = (torch.randn(b, s, h, d, generator=g).transpose(1, 2).requires_grad_(True) for _ in range(2))
    angles = torch.randn(b, s, d // 2, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    dq_out, dk_out = (torch.randn(b, s, h, d, generator=g).transpose(1, 2) for _ in range(2))
    got = apply_rope(q, k, cos, sin)
    want = llama.apply_rotary_pos_emb(q, k, cos, sin)
    grads = torch.autograd.grad(got, (q, k), (dq_out, dk_out))
    ref_grads = torch.autograd.grad(want, (q, k), (dq_out, dk_out))
    for x, ref, like in zip(got + grads, want + ref_grads, (q, k, q, k)):
        assert rel_err(x, ref) < 1e-6
        assert x.stride() == like.stride()  # so the transposes and reshapes around it are views, not copies


def test_under_autocast_rope_returns_what_attention_casts_its_float32_result_to(seed):
    # bf16 q/k from the projections, float32 cos/sin from the rotary embedding: the float32 product is cast to
    # bf16 by every attention, so the kernel writes bf16 (same values; no float32 q/k copies in memory)
    import transformers.models.llama.modeling_llama as llama

    g = torch.Generator().manual_seed(seed)
    b, s, h, d = 1, 9, 4, 8
    q, k = (torch.randn(b, s, h, d, generator=g).bfloat16().transpose(1, 2).requires_grad_(True) for _ in range(2))
    angles = torch.randn(b, s, d // 2, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = apply_rope(q, k, cos, sin)
    want = tuple(x.to(torch.bfloat16) for x in llama.apply_rotary_pos_emb(q, k, cos, sin))  # float32, then cast
    dq_out, dk_out = (torch.randn(b, s, h, d, generator=g).bfloat16().transpose(1, 2) for _ in range(2))
    grads = torch.autograd.grad(got, (q, k), (dq_out, dk_out))
    ref_grads = torch.autograd.grad(want, (q, k), (dq_out, dk_out))
    for x, ref in zip(got + grads, want + ref_grads):
        assert x.dtype == torch.bfloat16
        assert rel_err(x.float(), ref.float()) < 1e-2  # one bf16 rounding (the kernel may fuse multiply-adds)
    plain = apply_rope(q, k, cos, sin)  # outside autocast: the model's own promotion, to float32
    assert plain[0].dtype == torch.float32
    for x, ref in zip(got, plain):
        assert torch.equal(x, ref.to(torch.bfloat16))  # the same kernel's values, rounded once
