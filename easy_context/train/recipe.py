"""The small pieces of a training loop that train.py calls: optimizer choice, per-step inputs, the run log,
and the loop's bookkeeping and stop decisions."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from .checkpoint import save_checkpoint
from ..parallel.inputs import SeqParallelInputs, prepare_seq_parallel_inputs, shift_labels
from .launch import finish, memory_stats
from .checkpoint import trim_log
from .pose import pose_position_ids


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


class TrainLoop:
    """The training loop's bookkeeping around each micro-step (counters, the log and progress bar, a checkpoint
    every ``checkpoint_every`` steps) and the decisions every rank takes together from one all-reduce per
    micro-step: stop at ``max_steps`` or past ``time_limit`` minutes; on a ``stop`` request (SIGINT, SIGTERM,
    a dead launcher: ``launch.StopRequests``) stop after the step with a checkpoint; on a non-finite loss stop
    before its backward (under DeepSpeed the backward also steps the optimizer) and checkpoint the state
    before it. ``saved``: the counters a resume restored (step, tokens, epoch, row)."""

    stop_on_non_finite = True  # off only where losses are known garbage (benchmarks/emulate_rank.py, rank > 0)

    def __init__(self, accelerator, output_dir: str, run_log: RunLog, saved: dict, stop, *, tokens_per_step: int,
                 max_steps: int, grad_accum: int = 1, time_limit: float | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2):
        from tqdm import tqdm

        self.accelerator, self.output_dir, self.run_log, self.stop = accelerator, output_dir, run_log, stop
        self.step, self.tokens, self.position = saved["step"], saved["tokens"], (saved["epoch"], saved["row"])
        self.micro = self.step * grad_accum
        self.tokens_per_step, self.max_steps, self.grad_accum = tokens_per_step, max_steps, grad_accum
        self.time_limit, self.every, self.keep = time_limit, checkpoint_every, keep_checkpoints
        self.loss, self.elapsed, self.stopping, self.diverged, self.saved_step = 0.0, 0.0, False, False, None
        self.bar = tqdm(total=max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train")
        self.t0, self.t_start = time.perf_counter(), time.time()

    def done(self) -> bool:
        """Before a micro-step: whether the loop ends here (only ever between optimizer steps)."""
        if self.micro % self.grad_accum:
            return False
        out_of_time = bool(self.time_limit) and self.elapsed > 60 * self.time_limit
        return self.step >= self.max_steps or out_of_time or self.stopping

    def agree(self, value: torch.Tensor) -> bool:
        """Collective, between a micro-step's forward and backward: all-reduce its loss ``value``, the clock
        (every rank takes the same time-limit decision) and the stop requests; False when the loss is not
        finite on some rank (every rank then skips the backward and ends the loop)."""
        now, stop = time.time() - self.t_start, float(self.stop.requested())
        flags = torch.tensor([value.detach().float().item(), now, stop], device=self.accelerator.device)
        self.loss, self.elapsed, stop = self.accelerator.reduce(flags, "mean").tolist()
        self.stopping = self.stopping or stop > 0
        self.diverged = self.stop_on_non_finite and not math.isfinite(self.loss)
        return not self.diverged

    def end_micro(self, lr: float, epoch: int, row: int) -> None:
        """After a micro-step (``row``: the sampler position after its batch); after an optimizer step: count it,
        log it, checkpoint every N steps."""
        self.micro += 1
        if not self.accelerator.sync_gradients:
            return
        self.step += 1
        self.tokens += self.tokens_per_step
        self.position = (epoch, row)
        dt, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        record = {"step": self.step, "loss": self.loss, "lr": lr, "tokens": self.tokens, "step_s": dt,
                  "tokens_per_s": self.tokens_per_step / dt, **memory_stats(), "time": time.time()}
        self.run_log.write(record)
        if self.accelerator.is_main_process:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)
        if self.every and self.step % self.every == 0 and self.step < self.max_steps:
            self.save()
            self.t0 = time.perf_counter()

    def save(self) -> str:
        """Collective: checkpoint the state after step ``self.step``."""
        epoch, row = self.position
        path = save_checkpoint(self.accelerator, self.output_dir, self.step,
                               {"tokens": self.tokens, "epoch": epoch, "row": row}, keep=self.keep)
        self.saved_step = self.step
        return path

    def end(self) -> None:
        """Collective, after the loop: when a stop request or a non-finite loss ended it early, checkpoint the
        last good state, say how to go on and end the process (non-zero); otherwise return (save the model)."""
        self.bar.close()
        self.stop.close()
        if not self.diverged and not (self.stopping and self.step < self.max_steps):
            return
        self.accelerator.step = self.step * self.grad_accum  # a diverged micro-step was counted, never taken
        path = self.save() if self.saved_step != self.step else None
        path = path or os.path.join(self.output_dir, "checkpoints", f"step_{self.step}")
        if self.diverged:
            code, why = 1, (f"the loss is not finite ({self.loss}) at step {self.step + 1}: stopped before its "
                            "update")
            how = f"--resume-from step_{self.step} and a lower --lr"
        else:
            code, why = self.stop.code, f"stopped by {self.stop.reason} after step {self.step}"
            how = "--resume"
        if self.accelerator.is_main_process:
            print(f"\n{why}. The training state after step {self.step} is saved in {path}; to continue, run the "
                  f"same command with {how}", file=sys.stderr, flush=True)
        finish(code)
