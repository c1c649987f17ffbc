"""What a training job does between building its model and its first step, and each micro-step after: shared by
train.py and train_cepe.py."""

from __future__ import annotations

import dataclasses
import os

import torch

from . import checkpoint
from .bf16_grads import Bf16Gradients, bf16_gradient_weights
from .data import ShardedSampler
from .loop import TrainLoop
from .optimizer import build_optimizer
from .run_log import RunLog, log_path


def prepare_training(accelerator, wrapped: torch.nn.Module, model: torch.nn.Module, cfg, sampler: ShardedSampler,
                     out_dir: str, resume_from: str | None):
    """(wrapped, optimizer, saved state, run log, bf16 gradients): DeepSpeed's batch and clipping settings from
    ``cfg`` (a train or CEPE config), AdamW over ``model``'s trainable parameters, both through
    ``accelerator.prepare``; the state of ``resume_from`` (a fresh one without it), ``sampler`` moved to its
    position, the run's log, and where ``cfg.bf16_grads`` says so the ``Bf16Gradients`` that micro_step steps
    with (else None)."""
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_clipping=cfg.max_grad_norm)
    optimizer = build_optimizer(model, ds, lr=cfg.lr, weight_decay=cfg.weight_decay)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    fresh = dict(step=0, tokens=0, epoch=0, row=0)
    saved = checkpoint.load_checkpoint(accelerator, resume_from) if resume_from else fresh
    sampler.set_position(saved["epoch"], saved["row"])
    run_log = RunLog(log_path(out_dir), main=accelerator.is_main_process, resume_step=saved["step"],
                     wandb_project=cfg.wandb, run_name=os.path.basename(os.path.abspath(out_dir)),
                     config=dataclasses.asdict(cfg))
    grads = None
    if getattr(cfg, "bf16_grads", False):
        grads = Bf16Gradients(bf16_gradient_weights(model), list(wrapped.parameters()))
    return wrapped, optimizer, saved, run_log, grads


def micro_step(accelerator, wrapped: torch.nn.Module, optimizer, loop: TrainLoop, inputs: tuple,
               max_grad_norm: float, grads: Bf16Gradients | None = None) -> bool:
    """One micro-step of ``wrapped(*inputs)`` under gradient accumulation (the optimizer steps on its last one;
    without DeepSpeed, gradients are clipped to ``max_grad_norm`` first, by ``grads`` where it holds them). False,
    with nothing taken on any rank, when some rank's loss is not finite."""
    with accelerator.accumulate(wrapped):
        loss, value, _ = wrapped(*inputs)
        if not loop.agree(value):  # a non-finite loss on some rank: no rank takes its backward (nor step)
            return False
        accelerator.backward(loss)
        if grads is not None:
            grads.step(optimizer, max_grad_norm)
        else:
            if accelerator.state.deepspeed_plugin is None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
            optimizer.step()
        optimizer.zero_grad()
    return True
