"""What a model adds to its logits or its loss, and which models sequence-parallel attention can run at all.

causal_lm_loss must equal the model's own ``model(input_ids, labels=...).loss`` (RecurrentGemma's logit soft-cap,
the MoE router's load-balancing loss, one process and sequence-parallel), and the startup self-check must catch a
wrapper that does not; models whose sequence mixing is not attention (recurrent, state-space, convolutional,
linear-attention layers) must be refused from their config, before any weights load."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers

from tests.helpers.distributed import run_distributed
from easy_context.hf import attention as hf
from easy_context.hf.attention import (apply_seq_parallel_monkey_patch, causal_lm_loss, check_model_fits_backend,
                             self_check_config)
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import BASE, batch

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


def test_self_check_compares_the_loss_with_the_models_own(monkeypatch):
    config = recurrent_gemma(0).config
    errs = self_check_config(config, "data_parallel")  # one process: the loss wrapper against model(labels=...)
    assert errs["loss"] < 1e-5, errs
    monkeypatch.setattr(hf, "_head_softcap", lambda config: None)  # a wrapper blind to the soft-cap
    with pytest.raises(RuntimeError, match="model's own loss"):
        self_check_config(config, "data_parallel")


def _moe_worker(rank, world, seed):
    ids, labels = batch(seed, 2, SEQ)
    ref_loss, ref_grads = _hf_loss_and_grads(mixtral(seed), ids, labels)
    for backend in ("zigzag_ring", "ulysses"):
        model = apply_seq_parallel_monkey_patch(backend, mixtral(seed))
        inp = prepare_seq_parallel_inputs(backend, ids, labels)
        out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, grad_reduction="sum")
        out.loss.backward()
        assert rel_err(out.value, ref_loss) < 1e-5, (backend, out.value, ref_loss)
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            assert rel_err(p.grad, ref_grads[n]) < 1e-5, (backend, n)
    config = mixtral(seed).config
    assert self_check_config(config, "zigzag_ring")["loss"] < 1e-4
    fixed = hf._moe_aux_spec
    hf._moe_aux_spec = lambda model: None  # a wrapper that drops the router's loss
    try:
        with pytest.raises(RuntimeError, match="model's own loss"):
            self_check_config(config, "zigzag_ring")
    finally:
        hf._moe_aux_spec = fixed


def test_sequence_parallel_moe_loss_includes_the_router_loss(seed):
    run_distributed(_moe_worker, 2, seed)


NON_ATTENTION = {
    "recurrent_gemma": lambda: transformers.RecurrentGemmaConfig(**SIZES, lru_width=64),
    "mamba": lambda: transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=4),
    "mamba2": lambda: transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=128, num_heads=8,
                                                head_dim=16),
    "jamba": lambda: transformers.JambaConfig(**SIZES),
    "falcon_h1": lambda: transformers.FalconH1Config(**SIZES),
    "zamba": lambda: transformers.ZambaConfig(),
    "lfm2": lambda: transformers.Lfm2Config(**SIZES, full_attn_idxs=[1]),  # layer 0: a short convolution
    "qwen3_next": lambda: transformers.Qwen3NextConfig(**SIZES),
    "rwkv": lambda: transformers.RwkvConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128),
}


@pytest.mark.parametrize("name", NON_ATTENTION)
def test_non_attention_sequence_mixers_are_refused(name):
    config = NON_ATTENTION[name]()
    with pytest.raises(ValueError, match="not attention"):
        check_model_fits_backend("zigzag_ring", config, sp_size=2)


def test_patching_a_recurrent_model_is_refused():
    model = recurrent_gemma(0)
    with pytest.raises(ValueError, match="not attention"):
        apply_seq_parallel_monkey_patch("zigzag_ring", model)
    assert apply_seq_parallel_monkey_patch("data_parallel", model) is model  # one process: its own layers


@pytest.mark.parametrize("config_cls", [
    transformers.LlamaConfig, transformers.MistralConfig, transformers.Qwen2Config, transformers.Qwen3Config,
    transformers.GemmaConfig, transformers.Gemma2Config, transformers.Gemma3TextConfig, transformers.MixtralConfig])
def test_attention_models_still_fit(config_cls):
    check_model_fits_backend("ulysses", config_cls(**SIZES), sp_size=2)
