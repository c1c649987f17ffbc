"""The model under evaluation: loaded with the plan's attention (USP's group and layout from the plan, the
self-check probing the sweep's largest length), inexact attention refused, and one sequence sharded for it:
whole on an unpatched model; padded to the layout's multiple and split over the group otherwise, with the same
NLL as one process."""

from __future__ import annotations

import math

import pytest
import torch

import easy_context.eval.model as eval_model
from easy_context.attention.layouts import num_chunks
from easy_context.eval.model import eval_dtype, load_eval_model, sp_shard
from easy_context.eval.perplexity import sequence_nll
from easy_context.hf.attention import registered_backend
from easy_context.parallel.groups import group_layout
from tests.helpers.distributed import run_distributed
from tests.helpers.tiny_models import tiny_model

CPU = torch.device("cpu")


def test_eval_dtype():
    assert eval_dtype("auto", CPU) is torch.float32
    assert eval_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert eval_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        eval_dtype("half", CPU)


def test_an_unpatched_model_gets_the_whole_sequence():
    model = tiny_model("llama", 0)
    ids = torch.arange(5, 16)
    labels = ids.clone()
    labels[:3] = -100
    inputs = sp_shard(model, ids, labels)
    assert inputs.input_ids.tolist() == [ids.tolist()]  # one row, no padding
    assert inputs.position_ids.tolist() == [list(range(11))]
    assert inputs.target_ids.tolist() == [labels.tolist()[1:] + [-100]]  # shifted once
    assert sp_shard(model, ids).target_ids is None


def test_attention_that_is_not_exact_is_refused():
    with pytest.raises(ValueError, match="s2attn is not exact attention"):
        load_eval_model("never-loaded", CPU, backend="s2attn")


def _load_worker(rank, world, path, seed):
    probes = []
    self_check_config = eval_model.self_check_config

    def recorded(*args, **kwargs):
        probes.append(kwargs.get("train_len"))
        return self_check_config(*args, **kwargs)

    eval_model.self_check_config = recorded
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(128, (203,), generator=g)  # a multiple of no layout's chunk count: padded
    labels = ids.clone()
    labels[:50] = -100
    whole = load_eval_model(path, CPU, backend=None)
    assert registered_backend(whole) is None and probes == []  # the model's own attention, no probe
    ref = sequence_nll(whole, ids, labels)
    for backend, ulysses, layout in [("usp", 2, "usp2x1"), ("usp", 1, "usp1x2"), ("zigzag_ring", None, "zigzag")]:
        model = load_eval_model(path, CPU, backend=backend, ulysses_degree=ulysses, max_length=512)
        reg = registered_backend(model)
        assert reg.backend.name == backend and group_layout(reg.backend.layout, reg.group) == layout
        inputs = sp_shard(model, ids, labels, pad_id=7)
        chunks = num_chunks(layout, world)
        assert inputs.input_ids.shape[1] * world == 203 + (-203 % chunks)
        nll, count = sequence_nll(model, ids, labels)
        assert count == ref[1] and math.isclose(nll, ref[0], rel_tol=1e-5), (backend, ulysses, nll, ref)
    assert probes == [512, 512, 512]  # the self-check probed positions up to the largest evaluated length


def test_loaded_with_the_plan_sharded_and_exact_on_2_processes(tmp_path, seed):
    tiny_model("llama", seed).save_pretrained(tmp_path / "model")
    run_distributed(_load_worker, 2, str(tmp_path / "model"), seed)
