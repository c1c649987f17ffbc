"""The optimizer of a run: DeepSpeed's CPU Adam (optimizer offloaded) and torch's AdamW are the same update."""

from __future__ import annotations

import os

import pytest
import torch

from easy_context.train.optimizer import build_optimizer, probe_cpu_once


class _Plugin:
    def __init__(self, zero: dict):
        self.deepspeed_config = {"zero_optimization": zero}


def _after_steps(optimizer_of, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    optimizer = optimizer_of(model)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(steps)]
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_without_offload_it_is_torch_adamw_over_the_trainable_parameters():
    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model, None, lr=1e-3, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["params"] == [model.weight]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("cuda", [False, True])
def test_on_a_gpu_machine_adamw_is_the_fused_kernel(monkeypatch, cuda):
    # fused: one kernel per step and no parameter-sized temporaries (foreach AdamW's square roots of the second
    # moments are one); the CPU keeps the foreach kernels the tests were written against
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    opt = build_optimizer(torch.nn.Linear(4, 4), None, lr=1e-3, weight_decay=0.1)
    assert bool(opt.defaults["fused"]) is cuda


def test_the_fused_kernel_takes_the_same_steps():
    def adamw(fused):
        return lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    torch.testing.assert_close(_after_steps(adamw(True)), _after_steps(adamw(False)), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not os.environ.get("EASY_CONTEXT_TEST_DEEPSPEED"),
                    reason="opt-in (builds DeepSpeed's CPU Adam once, minutes): set EASY_CONTEXT_TEST_DEEPSPEED=1")
def test_cpu_adam_with_weight_decay_takes_torch_adamws_steps():
    offload = _Plugin({"offload_optimizer": {"device": "cpu"}})
    start = _after_steps(lambda m: build_optimizer(m, None, lr=1e-2, weight_decay=0.0), steps=0)
    ours = _after_steps(lambda m: build_optimizer(m, offload, lr=1e-2, weight_decay=0.1))
    reference = _after_steps(lambda m: build_optimizer(m, None, lr=1e-2, weight_decay=0.1))
    assert "CPUAdam" in type(build_optimizer(torch.nn.Linear(2, 2), offload, lr=1.0, weight_decay=0.1)).__name__
    assert (reference - start).abs().max() > 1e-2  # the steps moved the weights
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_the_cpu_is_probed_once_per_process_and_every_caller_gets_its_own_answer(monkeypatch):
    cpuinfo = pytest.importorskip("cpuinfo")
    calls = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: calls.append(1) or {"vendor_id_raw": "v", "flags": ["avx2"]})
    probe_cpu_once()
    probe_cpu_once()  # a second call does not wrap the cache again
    from cpuinfo import get_cpu_info  # as DeepSpeed's CPU ops import it, at each use

    first = get_cpu_info()
    first["flags"].append("changed by a caller")
    assert get_cpu_info() == {"vendor_id_raw": "v", "flags": ["avx2"]} and calls == [1]
