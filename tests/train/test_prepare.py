"""prepare.py's micro_step: with accelerate's bf16 autocast, bf16 gradient storage trains bit for bit as the float32
path (clip, then one optimizer step), through the recipe's model, loss and checkpointing."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import easy_context as ec
from easy_context.memory.offload import setup_checkpointing
from easy_context.train.bf16_grads import Bf16Gradients, bf16_gradient_weights
from easy_context.train.prepare import micro_step
from tests.helpers.tiny_models import batch, tiny_model


class AlwaysFinite:
    """The part of TrainLoop micro_step uses: every loss agreed finite."""

    def agree(self, value: torch.Tensor) -> bool:
        return bool(torch.isfinite(value))


@pytest.fixture
def bf16_accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)


def train(accelerator, family: str, seed: int, stored: bool, steps: int = 3, lora: bool = False, **checkpointing):
    """``steps`` micro_steps (clipped at 0.05, which acts) of a tiny checkpointed model (with LoRA+ adapters where
    ``lora``; ``checkpointing``: setup_checkpointing's options); its parameters."""
    model = tiny_model(family, seed)
    if lora:
        ec.apply_lora_plus(model, r=4, alpha=8)
    setup_checkpointing(model, **checkpointing)
    wrapped = ec.CausalLMWithLoss(model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    grads = Bf16Gradients(bf16_gradient_weights(model), list(wrapped.parameters())) if stored else None
    for step in range(steps):
        ids, labels = batch(seed + step, 1, 32)
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        assert micro_step(accelerator, wrapped, optimizer, AlwaysFinite(), (ids, targets, None, None), 0.05, grads)
    return dict(model.named_parameters()), grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings and q/k/v biases
def test_bf16_gradients_train_as_the_float32_path_bit_for_bit(bf16_accelerator, family, seed):
    ref, _ = train(bf16_accelerator, family, seed, stored=False)
    got, grads = train(bf16_accelerator, family, seed, stored=True)
    assert len(grads.names) >= 14  # the 7 projections of each of the 2 layers at least
    for name, p in ref.items():
        assert torch.equal(got[name], p), name


def test_lora_adapters_keep_bf16_gradients_and_train_as_the_float32_path(bf16_accelerator, seed):
    ref, _ = train(bf16_accelerator, "llama", seed, stored=False, lora=True)
    got, grads = train(bf16_accelerator, "llama", seed, stored=True, lora=True)
    assert sorted(grads.names.values()) == sorted(n for n in got if ".lora_" in n)  # the frozen bases are left out
    for name, p in ref.items():
        assert torch.equal(got[name], p), name


@pytest.mark.parametrize("checkpointing", [dict(layers_per_checkpoint=2, group_recompute="group"),
                                           dict(skip_last=1), dict(offload=-1)],
                         ids=["two-layer-groups", "last-not-checkpointed", "inputs-offloaded"])
def test_bf16_gradients_train_as_the_float32_path_under_other_checkpointing(bf16_accelerator, seed, checkpointing):
    ref, _ = train(bf16_accelerator, "llama", seed, stored=False, **checkpointing)
    got, grads = train(bf16_accelerator, "llama", seed, stored=True, **checkpointing)
    assert not grads.float32
    for name, p in ref.items():
        assert torch.equal(got[name], p), name
