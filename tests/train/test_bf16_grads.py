"""bf16_grads.py: linear weights' gradients kept in bf16 until the step, with the float32 path's results bit for bit."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from easy_context.memory.tiled_mlp import apply_tiled_mlp
from easy_context.train.bf16_grads import (Bf16Gradients, bf16_gradient_weights, bf16_grads_blocker, check_bf16_grads,
                                          linear_weights)
from easy_context.train.config import parse_config
from tests.helpers.dispatch import OpCounter


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 48), generator=g) for _ in range(steps)]


def loss_of(model, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    device = model.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        ids = ids.to(model.device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def train(model, *, stored: bool, max_grad_norm: float, steps: int = 3, chunk_bytes: int = 40_000,
          autocast: bool = True) -> tuple[LlamaForCausalLM, torch.optim.Optimizer, list[float]]:
    """``steps`` AdamW steps with clipping: the float32 path (backward, clip_grad_norm_, step), or with stored
    bf16 gradients; returns the model, optimizer and each step's gradient norm."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=model.device.type == "cuda" or None)
    grads = Bf16Gradients(linear_weights(model), params, chunk_bytes=chunk_bytes) if stored else None
    norms = []
    for ids in batches(steps):
        loss_of(model, ids, autocast).backward()
        if grads is None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
            opt.step()
        else:
            norms.append(float(grads.step(opt, max_grad_norm)))
        opt.zero_grad()
    return model, opt, norms


def test_unset_it_is_decided_per_run_and_given_it_is_taken_where_it_is_exact():
    assert parse_config([]).bf16_grads is None  # decided by run_defaults, from the GPU and the launch
    assert parse_config(["--bf16-grads"]).bf16_grads is True
    assert parse_config(["--no-bf16-grads"]).bf16_grads is False
    assert bf16_grads_blocker(gpu=True, deepspeed=False, processes=1) is None
    check_bf16_grads(gpu=True, deepspeed=False, processes=1)  # one CUDA process without DeepSpeed: no refusal


@pytest.mark.parametrize("gpu, deepspeed, processes, says", [
    (False, False, 1, "CUDA GPU's bf16 autocast"),
    (True, True, 1, "DeepSpeed holds the gradients"),
    (True, False, 4, "4 processes"),
])
def test_asked_for_where_it_cannot_be_it_is_refused(gpu, deepspeed, processes, says):
    assert says in bf16_grads_blocker(gpu=gpu, deepspeed=deepspeed, processes=processes)
    with pytest.raises(SystemExit, match=f"--bf16-grads: .*{says}.*leave the flag out"):
        check_bf16_grads(gpu=gpu, deepspeed=deepspeed, processes=processes)


def test_with_accumulation_it_is_refused_as_the_command_is_read():
    with pytest.raises(SystemExit, match="--bf16-grads keeps one gradient per step; --grad-accum 4"):
        parse_config(["--bf16-grads", "--grad-accum", "4"])


def test_linear_weights_are_the_projections_and_an_untied_output_layer():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    projections = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert {n for n, _ in linear_weights(tied)} == projections  # lm_head shares the embedding: left out
    assert {n for n, _ in linear_weights(untied)} == projections | {"lm_head.weight"}
    assert {n for n, _ in linear_weights(untied, exclude={id(untied.lm_head.weight)})} == projections


def test_a_causal_lm_leaves_out_its_output_layer_and_tiled_mlps():
    model = tiny_llama(tied=False)
    attention = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qkvo"}
    mlp = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("gate", "up", "down")}
    assert {n for n, _ in bf16_gradient_weights(model)} == attention | mlp  # the loss sums lm_head's in float32
    apply_tiled_mlp(model, 16)
    assert {n for n, _ in bf16_gradient_weights(model)} == attention  # tiles sum theirs in float32


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e9], ids=["clipped", "not-clipped"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_equals_the_float32_path_bit_for_bit(tied, max_grad_norm):
    ref, ref_opt, ref_norms = train(tiny_llama(tied), stored=False, max_grad_norm=max_grad_norm)
    got, got_opt, got_norms = train(tiny_llama(tied), stored=True, max_grad_norm=max_grad_norm)
    assert got_norms == ref_norms
    if max_grad_norm < 1:
        assert min(ref_norms) > max_grad_norm  # the clipping did act
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt.state[a][key], got_opt.state[b][key]), (name, key)


def test_between_backward_and_step_the_weights_hold_bf16_gradients_only():
    model = tiny_llama(tied=True)
    weights = linear_weights(model)
    grads = Bf16Gradients(weights, list(model.parameters()))
    loss_of(model, batches(1)[0], autocast=True).backward()
    assert all(m.weight.grad is None for _, m in weights)
    assert sorted(grads.grads) == sorted(id(m.weight) for _, m in weights)
    assert all(g.dtype == torch.bfloat16 for g in grads.grads.values())
    assert model.model.embed_tokens.weight.grad.dtype == torch.float32  # not a linear weight: as before
    grads.step(torch.optim.AdamW(model.parameters()), 1.0)
    assert not grads.grads and all(p.grad is None for p in model.parameters())


def test_a_stored_gradient_is_never_float32_until_the_step():
    # what the backward and step convert, per weight: its recompute's cast to bf16, and its bf16 gradient to
    # float32 in the step (no float32 gradient from autograd, rounded to bf16 again: two copies a weight saved)
    model = tiny_llama(tied=True)
    weights = linear_weights(model)
    grads = Bf16Gradients(weights, list(model.parameters()))
    loss = loss_of(model, batches(1)[0], autocast=True)
    shapes = {tuple(m.weight.shape) for _, m in weights}
    with OpCounter(["_to_copy"]) as ops:
        loss.backward()
        grads.step(torch.optim.AdamW(model.parameters()), 1.0)
    converted = Counter(op.dtypes[0] for op in ops.seen if op.shapes[0] in shapes)
    assert converted == {torch.float32: len(weights), torch.bfloat16: len(weights)}


def test_projections_of_one_input_share_its_cast():
    # autocast casts a matmul's float32 input per matmul: q, k and v each cast the same norm output, gate and up
    # theirs; here each input is cast once (2 casts a layer instead of 5) and its gradient still cast back per use
    model = tiny_llama(tied=True)
    Bf16Gradients(linear_weights(model), list(model.parameters()))
    ids = batches(1)[0]
    with OpCounter(["_to_copy"]) as ops:
        loss = loss_of(model, ids, autocast=True)
    hidden = (1, ids.shape[1], model.config.hidden_size)
    casts = [op for op in ops.seen if op.shapes[0] == hidden and op.dtypes[0] == torch.float32]
    assert len(casts) == 2 * model.config.num_hidden_layers + 1  # + the tied output layer's (not a stored weight)
    loss.backward()  # checkpointed: the recompute shares its casts too, and the gradients are those of separate
                     # casts (test_training_equals_the_float32_path_bit_for_bit)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "float32"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no-grad"])
def test_a_layer_that_casts_its_own_weight_computes_what_it_did(autocast, grad):
    layer = torch.nn.Linear(64, 160)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
        before = layer(x)
        Bf16Gradients([("weight", layer)], list(layer.parameters()))
        after = layer(x)
    assert after.dtype == before.dtype and torch.equal(after, before)


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e9], ids=["clipped", "not-clipped"])
def test_gradients_that_are_not_bf16_numbers_stay_float32_and_train_as_the_float32_path(max_grad_norm, capsys):
    # without autocast every matmul is float32: each weight is found out on the first step, before any rounding
    ref, ref_opt, ref_norms = train(tiny_llama(tied=True), stored=False, max_grad_norm=max_grad_norm, autocast=False)
    got, got_opt, got_norms = train(tiny_llama(tied=True), stored=True, max_grad_norm=max_grad_norm, autocast=False)
    assert got_norms == ref_norms
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(ref_opt.state[a]["exp_avg_sq"], got_opt.state[b]["exp_avg_sq"]), name
    assert "14 weights whose gradients are not bf16 numbers keep float32 gradients" in capsys.readouterr().err


def test_a_weight_found_float32_keeps_its_float32_gradient_from_then_on():
    model = tiny_llama(tied=True)
    weights = linear_weights(model)
    grads = Bf16Gradients(weights, list(model.parameters()))
    loss_of(model, batches(1)[0], autocast=False).backward()
    assert not grads.grads and all(m.weight.grad.dtype == torch.float32 for _, m in weights)
    grads.step(torch.optim.AdamW(model.parameters()), 1.0)
    loss_of(model, batches(1)[0], autocast=True).backward()  # now bf16 numbers, but the weights were found out
    assert not grads.grads and all(m.weight.grad is not None for _, m in weights)


def test_a_second_gradient_before_the_step_is_refused():
    model = tiny_llama(tied=True)
    Bf16Gradients(linear_weights(model), list(model.parameters()))
    ids = batches(1)[0]
    loss_of(model, ids, autocast=True).backward()
    with pytest.raises(RuntimeError, match=r"second gradient.*--no-bf16-grads"):
        loss_of(model, ids, autocast=True).backward()


def test_a_weight_also_used_outside_its_layer_is_refused():
    # its float32 gradient arrives after its bf16 one (the weight's accumulation waits for both): not stored apart
    layer = torch.nn.Linear(64, 160)
    Bf16Gradients([("weight", layer)], list(layer.parameters()))
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer(x).float().sum()
    outside = (x @ layer.weight.t()).sum()  # float32, outside autocast
    with pytest.raises(RuntimeError, match=r"second gradient.*used outside its layer.*--no-bf16-grads"):
        (outside + inside).backward()


def test_weights_outside_the_optimizer_are_refused():
    model = tiny_llama(tied=True)
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        Bf16Gradients(linear_weights(model), list(model.model.embed_tokens.parameters()))


def test_chunks_of_any_size_step_alike():
    one, _, _ = train(tiny_llama(tied=False), stored=True, max_grad_norm=0.05, chunk_bytes=1)
    all_at_once, _, _ = train(tiny_llama(tied=False), stored=True, max_grad_norm=0.05, chunk_bytes=1 << 40)
    for a, b in zip(one.parameters(), all_at_once.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e9], ids=["clipped", "not-clipped"])
def test_on_cuda_with_fused_adamw_training_equals_the_float32_path_bit_for_bit(max_grad_norm):
    ref, ref_opt, ref_norms = train(tiny_llama(tied=False).cuda(), stored=False, max_grad_norm=max_grad_norm)
    got, got_opt, got_norms = train(tiny_llama(tied=False).cuda(), stored=True, max_grad_norm=max_grad_norm)
    assert got_norms == ref_norms
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(ref_opt.state[a]["exp_avg_sq"], got_opt.state[b]["exp_avg_sq"]), name
