"""hf/compatibility.py: models whose sequence mixing is not attention (recurrent, state-space, convolutional,
linear-attention layers) are refused from their config, before any weights load; attention models fit; q heads
must split over the all-to-all group of the backends that split them, from a backend name or from a plan."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers

from easy_context.attention.registry import get_backend
from easy_context.hf.attention import apply_seq_parallel_monkey_patch
from easy_context.hf.compatibility import check_model_fits_backend, check_model_fits_plan
from easy_context.parallel.groups import ParallelGroups
from easy_context.parallel.plan import ParallelPlan
from tests.hf.test_causal_lm import SIZES, recurrent_gemma

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


def _plan(backend: str, sp_size: int, attention_group=None) -> ParallelPlan:
    """A plan as ``resolve_plan`` would make it on ``sp_size`` ranks, without the process groups."""
    groups = ParallelGroups(None, None, 0, sp_size, 0, 1)
    return ParallelPlan(get_backend(backend), groups, attention_group, get_backend(backend).layout)


def test_q_heads_must_split_over_the_all_to_all_group():
    config = transformers.LlamaConfig(**SIZES)  # 4 q heads
    with pytest.raises(ValueError, match=r"4 q heads cannot be split evenly .* of 3 ranks"):
        check_model_fits_backend("ulysses", config, sp_size=3)
    with pytest.raises(ValueError, match="of 3 ranks"):
        check_model_fits_plan(config, _plan("ulysses", 3))
    usp_4x3 = SimpleNamespace(ulysses_degree=4, ring_degree=3)  # a USP group's degrees: 4 ways is fine
    check_model_fits_plan(config, _plan("usp", 12, usp_4x3))
    check_model_fits_backend("usp", config, sp_size=12, ulysses_degree=4)
    with pytest.raises(ValueError, match="of 3 ranks"):
        check_model_fits_plan(config, _plan("usp", 6, SimpleNamespace(ulysses_degree=3, ring_degree=2)))
    check_model_fits_plan(config, _plan("zigzag_ring", 3))  # ring backends never split heads


def test_a_plan_that_does_not_split_the_sequence_fits_any_model():
    config = NON_ATTENTION["mamba"]()
    check_model_fits_plan(config, _plan("data_parallel", 1))
    check_model_fits_backend("data_parallel", config, sp_size=1)
    with pytest.raises(ValueError, match="not attention"):
        check_model_fits_plan(config, _plan("ring", 2))
