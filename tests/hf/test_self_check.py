"""hf/self_check.py: the startup self-check passes an exact model (test_attention.py, test_rope.py), catches a
broken patch (each rank attending to its own shard only) and a loss wrapper that misses what the model's own
loss applies, and refuses a model that does not run an easy_context backend."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers.distributed import run_distributed
from easy_context.attention.kernels import get_kernel
from easy_context.attention.registry import Backend
from easy_context.hf import causal_lm
from easy_context.hf.attention import use_sequence_parallel_attention
from easy_context.hf.self_check import self_check, self_check_config
from tests.hf.test_causal_lm import recurrent_gemma
from tests.helpers.tiny_models import tiny_model


def _local_only(q, k, v, *, causal=True, scale=None, group=None, kernel=None, return_lse=False, check=True):
    # The EasyContext failure mode: each rank attends only to its own shard.
    return get_kernel("cpu_flash").forward(q, k, v, causal, scale or q.shape[-1] ** -0.5)[0]


def _broken_patch_worker(rank, world, seed):
    model = tiny_model("llama", seed)
    use_sequence_parallel_attention(Backend("local_only", _local_only, "zigzag"), model)
    with pytest.raises(RuntimeError, match="differs from full-sequence sdpa"):
        self_check(model)


def test_self_check_catches_a_broken_patch(seed):
    run_distributed(_broken_patch_worker, 2, seed)


def test_self_check_refuses_a_model_without_an_easy_context_backend():
    with pytest.raises(ValueError, match="not an easy_context backend"):
        self_check(tiny_model("llama", 0))


def test_self_check_compares_the_loss_with_the_models_own(monkeypatch):
    config = recurrent_gemma(0).config
    errs = self_check_config(config, "data_parallel")  # one process: the loss wrapper against model(labels=...)
    assert errs["loss"] < 1e-5, errs
    monkeypatch.setattr(causal_lm, "_head_softcap", lambda config: None)  # a wrapper blind to the soft-cap
    with pytest.raises(RuntimeError, match="model's own loss"):
        self_check_config(config, "data_parallel")


def test_the_probe_model_is_built_on_the_device_it_checks(monkeypatch):
    # built on the CPU and moved, a 7B shape's probe (1.6B parameters with its embeddings) took 16 s to initialise
    class Built(Exception):
        pass

    def build(config, **kwargs):
        raise Built(torch.get_default_device())  # where from_config would put the parameters

    config = tiny_model("llama", 0).config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", build)
    with pytest.raises(Built) as built:
        self_check_config(config, "data_parallel", device="meta")
    assert built.value.args[0] == torch.device("meta")
