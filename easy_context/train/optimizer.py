"""The optimizer of a training run: AdamW over the trainable parameters, on the CPU when DeepSpeed offloads it."""

from __future__ import annotations

import copy
import functools

import torch

try:
    import cpuinfo  # py-cpuinfo, which DeepSpeed's CPU ops ask about the CPU
except ImportError:
    cpuinfo = None

_CACHED = "_easy_context_cached"


def probe_cpu_once() -> None:
    """Make py-cpuinfo's ``get_cpu_info`` answer from a cache after its first call in this process (each caller
    gets its own copy): it runs a subprocess, 1.2 s, and DeepSpeed's CPU Adam asks it three times as it loads."""
    if cpuinfo is None or getattr(cpuinfo.get_cpu_info, _CACHED, False):
        return
    probe = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        return copy.deepcopy(probe())

    setattr(get_cpu_info, _CACHED, True)
    cpuinfo.get_cpu_info = get_cpu_info


def build_optimizer(model, deepspeed_plugin, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: DeepSpeed's CPU Adam when the DeepSpeed config offloads the
    optimizer to CPU (ZeRO-Offload needs it), torch's AdamW otherwise (its fused kernel on a GPU machine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    zero = (deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if deepspeed_plugin else {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        probe_cpu_once()
        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay, adamw_mode=True)
    # on a GPU machine the parameters train on the GPU: the fused kernel is one launch per step and needs none of
    # the foreach kernels' parameter-sized temporaries
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                             fused=torch.cuda.is_available() or None)
