"""The optimizer of a training run: AdamW over the trainable parameters, on the CPU when DeepSpeed offloads it."""

from __future__ import annotations

import torch


def build_optimizer(model, deepspeed_plugin, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: DeepSpeed's CPU Adam when the DeepSpeed config offloads the
    optimizer to CPU (ZeRO-Offload needs it), torch's AdamW otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    zero = (deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if deepspeed_plugin else {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
