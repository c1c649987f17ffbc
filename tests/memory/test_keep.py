"""keep.py: with gradient checkpointing, kept attention outputs give the same loss and gradients while each
layer's attention runs once per step instead of twice (forward and recompute)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.parallel.groups import init_groups
from easy_context.hf.attention import apply_seq_parallel_monkey_patch
from easy_context.hf.causal_lm import causal_lm_loss
from easy_context.parallel.inputs import prepare_seq_parallel_inputs
from easy_context.memory.layer_groups import GROUP_RECOMPUTE
from easy_context.memory.offload import setup_checkpointing
from easy_context.memory.keep import keep_attention_outputs, keep_by_default, kept_attention_bytes
from easy_context.attention.kernels import CPUFlashKernel
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model

SEQ = 64
BACKENDS = ["zigzag_ring", "ring", "ulysses", "dist_flash"]


class CountingKernel(CPUFlashKernel):
    """The CPU kernel, counting its forward calls."""

    def __init__(self):
        self.forwards = 0

    def _forward(self, q, k, v, causal, scale):
        self.forwards += 1
        return super()._forward(q, k, v, causal, scale)


def _step(backend: str, group, keep: bool, seed: int = 0, stale: bool = False, k: int = 1,
          recompute: str = "layer", offload: int = 0):
    """(loss, {name: grad}, kernel forward calls, the store or None) of one checkpointed training step;
    ``stale``: first a forward on other tokens that is never backpropagated; ``k``: layers per checkpoint, each
    group recomputed as ``recompute`` says; ``offload``: layers whose saved inputs wait in host memory."""
    model = tiny_model("llama", seed)
    setup_checkpointing(model, offload=offload, layers_per_checkpoint=k, group_recompute=recompute)
    model.train()
    kernel = CountingKernel()
    apply_seq_parallel_monkey_patch(backend, model, group, kernel=kernel, check=False)
    store = keep_attention_outputs(model) if keep else None
    ids, labels = batch(seed, 2, SEQ)
    inp = prepare_seq_parallel_inputs(backend, ids, labels, group=group)
    if stale:
        other = prepare_seq_parallel_inputs(backend, *batch(seed + 1, 2, SEQ), group=group)
        causal_lm_loss(model, other.input_ids, other.target_ids, other.position_ids)
        kernel.forwards = 0
    out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kernel.forwards, store


def _check(backend: str, group) -> None:
    loss, grads, calls, _ = _step(backend, group, keep=False)
    kept_loss, kept_grads, kept_calls, store = _step(backend, group, keep=True)
    assert torch.equal(kept_loss, loss)
    for n, g in grads.items():
        assert rel_err(kept_grads[n], g) < 1e-6, n
    assert kept_calls * 2 == calls  # forward only, no recompute of the attention
    assert not store  # every kept output was handed back to its recompute


def _worker(rank, world):
    groups = init_groups(world)
    for backend in BACKENDS:
        _check(backend, groups.sp_group)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_process_same_gradients_half_the_attention(backend):
    _check(backend, None)


def test_two_processes_same_gradients_half_the_attention():
    run_distributed(_worker, 2)


def test_a_forward_never_backpropagated_leaves_nothing_stale():
    loss, grads, _, _ = _step("zigzag_ring", None, keep=False)
    kept_loss, kept_grads, _, store = _step("zigzag_ring", None, keep=True, stale=True)
    assert torch.equal(kept_loss, loss) and not store
    for n, g in grads.items():
        assert rel_err(kept_grads[n], g) < 1e-6, n


@pytest.mark.parametrize("offload", [1, -1], ids=["first-layer", "every-layer"])
def test_with_offloaded_layer_inputs_the_outputs_are_kept_alike(offload):
    loss, grads, calls, _ = _step("zigzag_ring", None, keep=False)
    kept_loss, kept_grads, kept_calls, store = _step("zigzag_ring", None, keep=True, offload=offload)
    assert torch.equal(kept_loss, loss) and not store
    for n, g in grads.items():
        assert rel_err(kept_grads[n], g) < 1e-6, n
    assert kept_calls * 2 == calls


@pytest.mark.parametrize("recompute", GROUP_RECOMPUTE)
def test_with_layer_groups_each_layer_keeps_its_output_once_and_nothing_is_left(recompute):
    loss, grads, calls, _ = _step("zigzag_ring", None, keep=False, k=2, recompute=recompute)
    kept_loss, kept_grads, kept_calls, store = _step("zigzag_ring", None, keep=True, k=2, recompute=recompute)
    assert torch.equal(kept_loss, loss)
    for n, g in grads.items():
        assert rel_err(kept_grads[n], g) < 1e-6, n
    assert not store  # layer by layer a group's first layers run a third time: that call stores nothing
    assert calls - kept_calls == tiny_model("llama", 0).config.num_hidden_layers  # one reused recompute per layer


def test_nothing_is_kept_without_autograd_or_in_eval():
    model = tiny_model("llama", 0)
    apply_seq_parallel_monkey_patch("zigzag_ring", model, None, kernel=CountingKernel(), check=False)
    store = keep_attention_outputs(model)
    ids, _ = batch(0, 1, SEQ)
    pos = torch.arange(SEQ)[None]
    model.train()
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos)
    assert not store
    model.eval()
    model(input_ids=ids, position_ids=pos)
    assert not store
    model.train()
    model(input_ids=ids, position_ids=pos)  # a forward never backpropagated ...
    assert len(store) == model.config.num_hidden_layers
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos)  # ... is cleared by the next forward
    assert not store


def test_s2attn_keeps_its_outputs_too():
    from easy_context.hf.s2attn import apply_s2attn

    def step(keep: bool):
        kernel = CountingKernel()
        model = apply_s2attn(tiny_model("llama", 0), kernel=kernel)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        store = keep_attention_outputs(model) if keep else None
        ids, labels = batch(0, 2, SEQ)
        inp = prepare_seq_parallel_inputs("ring", ids, labels)
        causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, kernel.forwards, store

    grads, calls, _ = step(False)
    kept_grads, kept_calls, store = step(True)
    assert kept_calls * 2 == calls and not store
    for n, g in grads.items():
        assert rel_err(kept_grads[n], g) < 1e-6, n


def test_kept_bytes_are_each_checkpointed_layers_output_and_float32_lse():
    model = tiny_model("llama", 0)
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    per_layer = 3 * 100 * (heads * dim * 2 + heads * 4)  # batch 3 x 100 local tokens: bf16 output, float32 lse
    assert kept_attention_bytes(cfg, tokens=300, dtype=torch.bfloat16, layers=2) == 2 * per_layer
    assert kept_attention_bytes(cfg, tokens=300, dtype=torch.bfloat16, layers=0) == 0


@pytest.mark.parametrize("kept, device, keep", [
    (2 << 30, 139 << 30, True),      # 1B shape at 32K on an H200: 2 GiB
    (139 << 26, 139 << 30, True),    # exactly the share
    (8 << 30, 80 << 30, False),      # 7B shape at 32K on an 80 GB GPU: more than 1/16
    (64 << 30, 139 << 30, False),    # 8B shape at 256K
    (1 << 20, None, False),          # no GPU (CPU runs): never by default
    (0, 139 << 30, False),           # nothing checkpointed: nothing to keep
])
def test_kept_by_default_only_where_the_outputs_take_a_small_share_of_the_gpu(kept, device, keep):
    assert keep_by_default(kept, device) is keep
