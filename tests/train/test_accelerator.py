"""accelerator.py: the Accelerator a training job runs under."""

from __future__ import annotations

import weakref

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from easy_context.train.accelerator import training_accelerator


class WeightCasts(TorchDispatchMode):
    """Weak references to every copy of a float32 weight cast to bf16."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.casts: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.weights:
            self.casts.append(weakref.ref(out))
        return out


class Checkpointed(torch.nn.Module):
    def __init__(self, layers: int = 4, width: int = 16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.alive_at_end: int | None = None
        self.casts: WeightCasts | None = None

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        self.alive_at_end = sum(ref() is not None for ref in self.casts.casts)  # where the loss would run
        return x.float().square().mean()


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_a_checkpointed_forward_holds_no_bf16_copy_of_an_earlier_layers_weights(fresh_state):
    # autocast's cast cache would keep every layer's bf16 weights alive until the forward ends (1.8 GiB of the
    # 1B shape's peak, which is at the loss); checkpointed layers need them again only when recomputed
    accelerator = training_accelerator(grad_accum=1, mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(Checkpointed())
    weights = [layer.weight for layer in model.layers]
    model.casts = WeightCasts(weights)
    with model.casts:
        loss = model(torch.randn(8, 16))
    assert len(model.casts.casts) >= len(weights)  # the weights were cast: autocast was on
    assert model.alive_at_end == 0
    loss.backward()
    assert all(w.grad is not None for w in weights)


def test_mixed_precision_follows_the_device(fresh_state):
    want = "bf16" if torch.cuda.is_available() else "no"
    assert training_accelerator(grad_accum=2).mixed_precision == want
