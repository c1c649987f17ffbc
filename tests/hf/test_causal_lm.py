"""hf/causal_lm.py: the chunked loss equals the model's own ``model(input_ids, labels=...).loss`` and its gradients,
with tied and untied output embeddings, a head soft-cap (Gemma 2, RecurrentGemma) and the MoE router's load-balancing
loss, one process and sequence-parallel; heads it cannot reproduce are refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers

from tests.helpers.distributed import run_distributed
from easy_context.hf import causal_lm
from easy_context.hf.attention import use_sequence_parallel_attention
from easy_context.hf.causal_lm import causal_lm_loss
from easy_context.hf.self_check import self_check_config
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import BASE, batch, tiny_model

SEQ = 32
SIZES = {k: v for k, v in BASE.items() if k not in ("attn_implementation", "use_cache")}


def _build(config, seed: int):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def recurrent_gemma(seed: int, **overrides):
    """A tiny RecurrentGemma (two recurrent blocks, one local-attention block) whose head soft-caps its logits."""
    config = transformers.RecurrentGemmaConfig(**{**SIZES, "num_hidden_layers": 3, "lru_width": 64,
                                                  "attention_window_size": 16, "logits_soft_cap": 3.0, **overrides})
    return _build(config, seed)


def mixtral(seed: int, **overrides):
    """A tiny Mixtral whose own loss adds 0.5 x the router's load-balancing loss."""
    config = transformers.MixtralConfig(**{**BASE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                           "output_router_logits": True, "router_aux_loss_coef": 0.5, **overrides})
    return _build(config, seed)


def _hf_loss_and_grads(model, ids, labels):
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [recurrent_gemma, mixtral])
def test_one_process_loss_equals_the_models_own_loss(build, seed):
    ids, labels = batch(seed, 2, SEQ)
    ref_loss, ref_grads = _hf_loss_and_grads(build(seed), ids, labels)
    model = build(seed)
    out = causal_lm_loss(model, ids, shift_labels(labels), chunk_size=7)
    out.loss.backward()
    assert rel_err(out.value, ref_loss) < 1e-6, (out.value, ref_loss)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[n]) < 1e-5, n


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}), ("qwen2", {}),  # untied and tied output embeddings
    ("gemma2", dict(final_logit_softcapping=5.0, attn_logit_softcapping=None, query_pre_attn_scalar=16,
                    attn_implementation="eager")),  # Gemma2 has no sdpa path
])
@pytest.mark.parametrize("fused_loss", [False, True])
def test_data_parallel_loss_equals_hf_loss(family, overrides, fused_loss, seed):
    ids, labels = batch(seed, 2, SEQ)
    ref_model, model = tiny_model(family, seed, **overrides), tiny_model(family, seed, **overrides)
    ref = ref_model(input_ids=ids, labels=labels).loss
    ref.backward()
    torch._dynamo.reset()  # the fused loss compiles its own variants, within the recompile limit
    out = causal_lm_loss(model, ids, shift_labels(labels), chunk_size=5, fused_loss=fused_loss)  # unpatched: local
    out.loss.backward()
    assert rel_err(out.value, ref) < 1e-6 and out.num_tokens == int((shift_labels(labels) != -100).sum())
    for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.grad, r.grad) < 1e-5, n


def test_the_wrapper_module_hands_its_loss_options_to_the_loss(seed, monkeypatch):
    seen = {}

    def loss(model, *args, **kwargs):
        seen.update(kwargs)
        return causal_lm.SPLoss(torch.zeros(()), torch.zeros(()), 1)

    monkeypatch.setattr(causal_lm, "causal_lm_loss", loss)
    ids, labels = batch(seed, 1, SEQ)
    causal_lm.CausalLMWithLoss(tiny_model("llama", seed), grad_reduction="sum", chunk_size=9,
                               fused_loss=True)(ids, shift_labels(labels))
    assert {k: seen[k] for k in ("grad_reduction", "chunk_size", "fused_loss")} == dict(
        grad_reduction="sum", chunk_size=9, fused_loss=True)


def test_causal_lm_loss_rejects_unsupported_heads():
    ids = torch.randint(128, (1, 8))
    model = tiny_model("llama", 0)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        causal_lm_loss(model, ids, ids)
    with pytest.raises(ValueError, match="causal-LM model"):
        causal_lm_loss(model.model, ids, ids)


def _moe_worker(rank, world, seed):
    ids, labels = batch(seed, 2, SEQ)
    ref_loss, ref_grads = _hf_loss_and_grads(mixtral(seed), ids, labels)
    for backend in ("zigzag_ring", "ulysses"):
        model = use_sequence_parallel_attention(backend, mixtral(seed))
        inp = prepare_seq_parallel_inputs(backend, ids, labels)
        out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, grad_reduction="sum")
        out.loss.backward()
        assert rel_err(out.value, ref_loss) < 1e-5, (backend, out.value, ref_loss)
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            assert rel_err(p.grad, ref_grads[n]) < 1e-5, (backend, n)
    config = mixtral(seed).config
    assert self_check_config(config, "zigzag_ring")["loss"] < 1e-4
    fixed = causal_lm._moe_aux_spec
    causal_lm._moe_aux_spec = lambda model: None  # a wrapper that drops the router's loss
    try:
        with pytest.raises(RuntimeError, match="model's own loss"):
            self_check_config(config, "zigzag_ring")
    finally:
        causal_lm._moe_aux_spec = fixed


def test_sequence_parallel_moe_loss_includes_the_router_loss(seed):
    run_distributed(_moe_worker, 2, seed)
