"""The small pieces of a training loop that train.py calls: optimizer choice, per-step inputs, the run log."""

from __future__ import annotations

import json
import os

import torch

from .inputs import SeqParallelInputs, prepare_seq_parallel_inputs, shift_labels


def build_optimizer(model, deepspeed_plugin, *, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters: DeepSpeed's CPU Adam when the DeepSpeed config offloads the
    optimizer to CPU (ZeRO-Offload needs it), torch's AdamW otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    zero = (deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if deepspeed_plugin else {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)


def step_inputs(backend: str, ids: torch.Tensor, group, *, labels: torch.Tensor | None = None,
                pose_target: int | None = None, generator: torch.Generator | None = None) -> SeqParallelInputs:
    """This rank's (input_ids, position_ids, target_ids) for one full batch ``ids`` [B, S] (``labels``
    default ``ids``; -100 where no loss):
    sharded for a sequence-parallel backend, whole for "data_parallel"; PoSE position ids spread over
    ``pose_target`` when given (``generator`` must be seeded identically on every rank of the SP group)."""
    labels = ids if labels is None else labels.to(ids.device)
    positions = None
    if pose_target:
        from .pose import pose_position_ids

        positions = torch.stack([pose_position_ids(ids.shape[1], pose_target, generator=generator)
                                 for _ in range(ids.shape[0])]).to(ids.device)
    if backend == "data_parallel":
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        return SeqParallelInputs(ids, positions, shift_labels(labels))
    return prepare_seq_parallel_inputs(backend, ids, labels, positions, group=group,
                                       allow_position_skips=bool(pose_target))


class RunLog:
    """The run's JSONL log (always, main process) and wandb (when a project is given)."""

    def __init__(self, path: str, *, main: bool, resume_step: int = 0, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.path, self.main, self.wandb = path, main, None
        if not main:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        from .checkpoint import trim_log

        trim_log(path, resume_step)  # what a killed run logged after the checkpoint we resume from goes
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
