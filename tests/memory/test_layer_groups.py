"""Checkpointing layers in groups of k: the loss and every parameter gradient equal those without checkpointing
(float64, CPU) for any k, with offload and with the last layers left out; forward keeps ceil(L / k) layer inputs
for the backward (on the host when offloaded) instead of L; the backward recomputes a whole group at once, last
group first; state dicts are unchanged; models whose layers of one group would get other arguments are refused."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from easy_context.memory import layer_groups
from easy_context.memory.layer_groups import (GROUP_RECOMPUTE, check_layer_groups, group_checkpointed_layers,
                                              valid_group_sizes)
from easy_context.memory.offload import OffloadedCheckpoint, _Offloaded, check_layer_counts, setup_checkpointing
from tests.helpers import zero3
from tests.helpers.distributed import run_distributed
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model

SEQ = 37
LAYERS = 4
SLIDING = dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)  # layers 2, 3 slide


def _model(family: str, seed: int, layers: int = LAYERS, **overrides):
    return tiny_model(family, seed, num_hidden_layers=layers, **overrides).double()


def _call_checkpointed(base: type) -> type:
    """``base`` (a transformers decoder layer class) checkpointed in ``__call__`` as transformers 5.0-5.17 does it,
    around the module call (``partial(super().__call__, **kwargs)``); later versions wrap ``forward`` instead."""

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(
                functools.partial(torch.nn.Module.__call__.__get__(self), **kwargs), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    old_style = type(f"CallCheckpointed{base.__name__}", (base,), {"__call__": __call__})
    old_style.forward = getattr(base.forward, "__wrapped__", base.forward)  # as defined: no checkpointing
    return old_style


def checkpoint_in_call(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its decoder layers checkpointed in ``__call__`` (``_call_checkpointed``)."""
    classes: dict[type, type] = {}
    for layer in layer_groups.decoder_layers(model):
        base = type(layer)
        layer.__class__ = classes.setdefault(base, _call_checkpointed(base))
    return model


def _grouped(family: str, seed: int, k: int, *, offload: int = 0, skip_last: int = 0, layers: int = LAYERS,
             recompute: str = "layer", in_call: bool = False, **overrides):
    model = _model(family, seed, layers, **overrides)
    if in_call:
        checkpoint_in_call(model)
    setup_checkpointing(model, offload=offload, skip_last=skip_last, layers_per_checkpoint=k,
                        group_recompute=recompute)
    return model.train()


def _loss_and_grads(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_equal(got, ref, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert torch.equal(loss, ref_loss), f"{what}: loss {loss} != {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g is not None and torch.equal(grads[n], g), f"{what}: gradient of {n} off by {rel_err(grads[n], g):.1e}"


def _reference(family: str, seed: int, ids, labels, layers: int = LAYERS, **overrides):
    """Loss and gradients without any checkpointing."""
    return _loss_and_grads(_model(family, seed, layers, **overrides).train(), ids, labels)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("k, recompute", [(1, "layer")] + [(k, r) for k in (2, 3, LAYERS) for r in GROUP_RECOMPUTE])
def test_groups_equal_no_checkpointing(family, k, recompute, seed):
    ids, labels = batch(seed, 2, SEQ)
    got = _loss_and_grads(_grouped(family, seed, k, recompute=recompute), ids, labels)
    _assert_equal(got, _reference(family, seed, ids, labels), f"{family} k={k} {recompute}")


@pytest.mark.parametrize("k, recompute", [(k, r) for k in (2, 3, LAYERS) for r in GROUP_RECOMPUTE])
def test_groups_equal_no_checkpointing_where_transformers_checkpoints_the_module_call(k, recompute, seed):
    ids, labels = batch(seed, 2, SEQ)
    model = _grouped("llama", seed, k, recompute=recompute, in_call=True)
    got = _loss_and_grads(model, ids, labels)
    _assert_equal(got, _reference("llama", seed, ids, labels), f"checkpointed in __call__, k={k} {recompute}")


@pytest.mark.parametrize("recompute", GROUP_RECOMPUTE)
@pytest.mark.parametrize("k", [2, 3, LAYERS])
@pytest.mark.parametrize("offload, skip_last", [(-1, 0), (2, 0), (0, 1), (-1, 1), (3, 2)])
def test_groups_compose_with_offload_and_skipped_last_layers(k, offload, skip_last, recompute, seed):
    ids, labels = batch(seed, 2, SEQ)
    model = _grouped("llama", seed, k, offload=offload, skip_last=skip_last, recompute=recompute)
    _assert_equal(_loss_and_grads(model, ids, labels), _reference("llama", seed, ids, labels),
                  f"k={k} offload={offload} skip_last={skip_last} {recompute}")


def _mlp_calls(model) -> list[int]:
    """The decoder layers' indices in the order their MLPs run (forward, then the backward's recomputes)."""
    order = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: order.append(i))
    return order


@pytest.mark.parametrize("k, skip_last, recompute", [
    (1, 0, [3, 2, 1, 0]), (2, 0, [2, 3, 0, 1]), (3, 0, [3, 0, 1, 2]), (4, 0, [0, 1, 2, 3]),
    (2, 1, [2, 0, 1]), (3, 1, [0, 1, 2]),
])
def test_backward_recomputes_whole_groups_last_group_first(k, skip_last, recompute, seed):
    model = _grouped("llama", seed, k, skip_last=skip_last, recompute="group")
    order = _mlp_calls(model)
    ids, labels = batch(seed, 2, SEQ)
    model(input_ids=ids, labels=labels).loss.backward()
    assert order == list(range(LAYERS)) + recompute


@pytest.mark.parametrize("k, skip_last, recompute", [
    (1, 0, [3, 2, 1, 0]), (2, 0, [2, 3, 2, 0, 1, 0]), (3, 0, [3, 0, 1, 2, 1, 0]), (4, 0, [0, 1, 2, 3, 2, 1, 0]),
    (2, 1, [2, 0, 1, 0]), (3, 1, [0, 1, 2, 1, 0]),
])
def test_layer_by_layer_the_group_runs_forward_to_its_last_layer_then_each_layer_recomputes_alone(
        k, skip_last, recompute, seed):
    model = _grouped("llama", seed, k, skip_last=skip_last)
    order = _mlp_calls(model)
    ids, labels = batch(seed, 2, SEQ)
    model(input_ids=ids, labels=labels).loss.backward()
    assert order == list(range(LAYERS)) + recompute


def _backward_peak(model, ids, labels) -> int:
    """The most bytes the CPU allocator held during the backward, above what it held when the backward began."""
    loss = model(input_ids=ids, labels=labels).loss
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage  # what the op itself allocated, less what it freed
        peak = max(peak, live)
    return peak


def test_layer_by_layer_the_backward_holds_one_layers_activations_and_the_groups_inputs(seed):
    ids, labels = batch(seed, 2, 512)  # long enough that activations outweigh the parameters' gradients
    per_layer = _backward_peak(_grouped("llama", seed, 1), ids, labels)
    by_layer = _backward_peak(_grouped("llama", seed, LAYERS), ids, labels)
    whole = _backward_peak(_grouped("llama", seed, LAYERS, recompute="group"), ids, labels)
    layer_input = 2 * 512 * _model("llama", seed).config.hidden_size * 8  # float64
    # one checkpoint per layer, plus at most the group's other inputs
    assert by_layer <= per_layer + (LAYERS - 1) * layer_input, (by_layer, per_layer, layer_input)
    # the whole group's recompute: every layer's activations at once, far more than two inputs per layer
    assert whole - per_layer > 2 * (LAYERS - 1) * layer_input, (whole, per_layer, layer_input)


def _zero3_worker(rank, world, seed):
    zero3.init(rank, world)
    ids, labels = batch(seed + rank, 1, SEQ)
    runs = [(r, in_call) for r in GROUP_RECOMPUTE for in_call in (False, True)]
    models = [_grouped("llama", seed, 1).float()]
    models += [_grouped("llama", seed, LAYERS, recompute=r, in_call=in_call).float() for r, in_call in runs]
    ref, *got = [zero3.loss_and_grads(m, ids, labels) for m in models]
    for result, (recompute, in_call) in zip(got, runs):
        _assert_equal(result, ref, f"ZeRO-3 rank {rank}, {recompute}{', checkpointed in __call__' if in_call else ''}")


@pytest.mark.skipif(not os.environ.get("EASY_CONTEXT_TEST_DEEPSPEED"),
                    reason="opt-in (~40 s on 2 cores): set EASY_CONTEXT_TEST_DEEPSPEED=1 (needs deepspeed)")
def test_groups_under_deepspeed_zero3_equal_one_layer_per_checkpoint(seed):
    # parameters are empty placeholders outside module calls: every recompute, nested ones too, gathers them
    pytest.importorskip("deepspeed")
    run_distributed(_zero3_worker, 2, seed)


class _SavedInDecoder:
    """Counts the tensors autograd saves outside checkpoint regions from just before the first decoder layer's call
    (after the rotary embedding) to just after the last one's (before the final norm): with every layer
    checkpointed, exactly what the checkpoints keep for their recompute. (Not hooks on the layers: where
    transformers checkpoints the module call, those run inside the region.)"""

    def __init__(self, model):
        self.saved: list[torch.Tensor] = []
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        model.model.rotary_emb.register_forward_hook(lambda *_: self.hooks.__enter__())
        model.model.norm.register_forward_pre_hook(lambda *_: self.hooks.__exit__(None, None, None))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel():  # torch <= 2.11 also saves checkpoint's empty marker
            self.saved.append(t)
        return t


@pytest.mark.parametrize("in_call", [False, True], ids=["forward-checkpointed", "call-checkpointed"])
@pytest.mark.parametrize("k", [1, 2, 3, LAYERS])
def test_forward_keeps_one_input_per_group(k, in_call, seed):
    model = _grouped("llama", seed, k, in_call=in_call)
    counter = _SavedInDecoder(model)
    ids, labels = batch(seed, 2, SEQ)
    loss = model(input_ids=ids, labels=labels).loss
    assert len(counter.saved) == math.ceil(LAYERS / k)
    assert all(t.shape == (2, SEQ, model.config.hidden_size) for t in counter.saved)  # hidden states only
    loss.backward()


@pytest.mark.parametrize("in_call", [False, True], ids=["forward-checkpointed", "call-checkpointed"])
@pytest.mark.parametrize("k, offload", [(1, -1), (2, -1), (3, -1), (LAYERS, -1), (2, 3), (3, 3)])
def test_offload_copies_one_input_per_group_to_the_host(k, offload, in_call, seed, monkeypatch):
    copies = []
    pack = OffloadedCheckpoint._pack

    def counting_pack(self, t):
        saved = pack(self, t)
        if isinstance(saved, _Offloaded):
            copies.append(saved.host.shape)
        return saved

    monkeypatch.setattr(OffloadedCheckpoint, "_pack", counting_pack)
    model = _grouped("llama", seed, k, offload=offload, in_call=in_call)
    ids, labels = batch(seed, 2, SEQ)
    got = _loss_and_grads(model, ids, labels)
    # the groups whose first layer is among the first `offload` layers
    assert copies == [(2, SEQ, model.config.hidden_size)] * math.ceil((LAYERS if offload < 0 else offload) / k)
    _assert_equal(got, _reference("llama", seed, ids, labels), f"k={k} offload={offload}")


def test_state_dict_keys_and_values_are_unchanged(seed):
    plain, grouped = _model("llama", seed), _grouped("llama", seed, 3)
    ref, got = plain.state_dict(), grouped.state_dict()
    assert list(got) == list(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert len(grouped.model.layers) == LAYERS and all(isinstance(m, type(plain.model.layers[0]))
                                                        for m in grouped.model.layers)


@pytest.mark.parametrize("in_call", [False, True], ids=["forward-checkpointed", "call-checkpointed"])
def test_evaluation_and_no_grad_run_each_layer_alone(in_call, seed):
    ids, _ = batch(seed, 2, SEQ)
    plain, grouped = _model("llama", seed).eval(), _grouped("llama", seed, 2, in_call=in_call)
    ref = plain(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=ids).logits, ref)  # training mode, no autograd: no checkpoint
    assert torch.equal(grouped.eval()(input_ids=ids).logits, ref)


@pytest.mark.parametrize("in_call", [False, True], ids=["forward-checkpointed", "call-checkpointed"])
def test_hidden_states_asked_for_are_each_layers_own(in_call, seed):
    ids, labels = batch(seed, 2, SEQ)
    plain, grouped = _model("llama", seed).train(), _grouped("llama", seed, 2, in_call=in_call)
    ref = plain(input_ids=ids, labels=labels, output_hidden_states=True)
    out = grouped(input_ids=ids, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    assert all(torch.equal(h, r) for h, r in zip(out.hidden_states, ref.hidden_states))
    ref.loss.backward()
    out.loss.backward()
    for (n, p), q in zip(grouped.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_sliding_window_layers_group_only_within_their_type(seed):
    model = _model("qwen2", seed, **SLIDING)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert valid_group_sizes(model.config.layer_types) == [1, 2]
    with pytest.raises(ValueError, match=r"would mix types.*among \[1, 2\]"):
        setup_checkpointing(model, layers_per_checkpoint=3)
    assert not any(m.gradient_checkpointing for m in model.model.layers)  # refused before anything changed
    with pytest.raises(ValueError, match=r"would mix types.*among \[1, 2\]"):
        check_layer_counts(LAYERS, layers_per_checkpoint=4, layer_types=model.config.layer_types)
    # leaving the sliding layers uncheckpointed leaves one type to group
    check_layer_counts(LAYERS, layers_per_checkpoint=2, skip_last=2, layer_types=model.config.layer_types)
    ids, labels = batch(seed, 2, SEQ)
    ref = _reference("qwen2", seed, ids, labels, **SLIDING)
    _assert_equal(_loss_and_grads(_grouped("qwen2", seed, 2, **SLIDING), ids, labels), ref, "qwen2 sliding k=2")
    _assert_equal(_loss_and_grads(_grouped("qwen2", seed, 2, skip_last=2, **SLIDING), ids, labels), ref,
                  "qwen2 sliding k=2 skip_last=2")


def test_a_layer_called_with_other_arguments_than_its_group_is_an_error(seed):
    # layer types hidden from the check: layer 2 (sliding) would get another mask than layer 1 (full)
    model = _model("qwen2", seed, **SLIDING)
    setup_checkpointing(model)
    types_ = model.config.layer_types
    model.config.layer_types = ["full_attention"] * LAYERS
    group_checkpointed_layers(model, 3)
    model.config.layer_types = types_
    ids, labels = batch(seed, 2, SEQ)
    with pytest.raises(RuntimeError, match=r"other arguments than the first layer of its group \(attention_mask\)"):
        model.train()(input_ids=ids, labels=labels)


def test_a_layer_called_with_other_hidden_states_than_its_groups_output_is_an_error(seed):
    model = _grouped("llama", seed, 2)
    model.model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] * 1.0,))
    ids, labels = batch(seed, 2, SEQ)
    with pytest.raises(RuntimeError, match="other hidden states than its group's output"):
        model(input_ids=ids, labels=labels)


def test_group_sizes_that_cannot_be_grouped_exactly_are_refused():
    check_layer_groups(32, 4)
    check_layer_groups(32, 32, skip_last=4)  # one group of the 28 checkpointed layers
    check_layer_groups(32, 1, skip_last=-1)
    with pytest.raises(ValueError, match="at least 1"):
        check_layer_groups(32, 0)
    with pytest.raises(ValueError, match="at most 32"):
        check_layer_groups(32, 33)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        check_layer_groups(32, 2, skip_last=-1)
    with pytest.raises(ValueError, match="at most 32"):
        check_layer_counts(32, layers_per_checkpoint=40)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        setup_checkpointing(_model("llama", 0), skip_last=-1, layers_per_checkpoint=2)


def test_grouping_twice_or_around_uncheckpointed_layers_is_refused(seed):
    model = _grouped("llama", seed, 2)
    with pytest.raises(ValueError, match="in groups already"):
        group_checkpointed_layers(model, 2)
    model = _model("llama", seed)
    setup_checkpointing(model)
    for layer in model.model.layers[1::2]:  # layers 0 and 2 checkpointed, 1 and 3 not
        layer.gradient_checkpointing = False
    with pytest.raises(ValueError, match="come first and in a row"):
        group_checkpointed_layers(model, 2)
    assert layer_groups.group_inputs(28, 4) == 7 and layer_groups.group_inputs(5, 2) == 3
