"""The training loop's bookkeeping and the decisions every rank takes together: when to stop (max steps, a time
limit, a stop request, a non-finite loss), what to log, when to checkpoint, and how a stopped run ends."""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from .checkpoint import checkpoint_root, save_checkpoint
from .distributed import finish
from .memory_snapshot import MemorySnapshot
from .memory_stats import memory_stats
from .run_log import RunLog
from .stop import StopRequests

SNAPSHOT_STEPS = 2  # --memory-snapshot records this many optimizer steps


def wait_for_device() -> None:
    """Block until the GPU has run all the work queued on it (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrainLoop:
    """The training loop's bookkeeping around each micro-step (counters, the log and progress bar, a checkpoint
    every ``checkpoint_every`` steps) and the decisions every rank takes together from one all-reduce per
    micro-step: stop at ``max_steps`` or past ``time_limit`` minutes; on a ``stop`` request (SIGINT, SIGTERM,
    a dead launcher: ``stop.StopRequests``) stop after the step with a checkpoint; on a non-finite loss stop
    before its backward (under DeepSpeed the backward also steps the optimizer) and checkpoint the state
    before it. ``saved``: the counters a resume restored (step, tokens, epoch, row); ``memory_snapshot``: a file
    for rank 0's GPU memory over the run's first two steps (``memory_snapshot.MemorySnapshot``)."""

    stop_on_non_finite = True  # off only where losses are known garbage (benchmarks/emulate_rank.py, rank > 0)

    def __init__(self, accelerator, output_dir: str, run_log: RunLog, saved: dict, stop: StopRequests, *,
                 tokens_per_step: int, max_steps: int, grad_accum: int = 1, time_limit: float | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2, memory_snapshot: str | None = None):
        from tqdm import tqdm

        self.accelerator = accelerator
        self.output_dir = output_dir
        self.run_log = run_log
        self.stop = stop
        self.step = saved["step"]
        self.tokens = saved["tokens"]
        self.position = (saved["epoch"], saved["row"])
        self.micro = self.step * grad_accum
        self.tokens_per_step = tokens_per_step
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.time_limit = time_limit
        self.every = checkpoint_every
        self.keep = keep_checkpoints
        self.loss = 0.0
        self.elapsed = 0.0
        self.stopping = False
        self.diverged = False
        self.saved_step: int | None = None
        self.bar = tqdm(total=max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train")
        self.t0 = time.perf_counter()
        self.t_start = time.time()
        snapshot = memory_snapshot and accelerator.is_main_process
        self.snapshot = MemorySnapshot(memory_snapshot) if snapshot else None
        # the first step builds the optimizer's state; the second, a steady one, is where a backward peaks
        self.snapshot_step = min(self.step + SNAPSHOT_STEPS, max_steps)

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
        now = time.time() - self.t_start
        stop = float(self.stop.requested())
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
        wait_for_device()  # the host returns from the step while the GPU still runs its backward and update
        now = time.perf_counter()
        dt = now - self.t0
        self.t0 = now
        if self.snapshot is not None and self.step >= self.snapshot_step:  # first: while it records, memory_stats'
            self.snapshot.dump()                                            # allocator snapshot takes seconds
            self.snapshot = None
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
        path = path or os.path.join(checkpoint_root(self.output_dir), f"step_{self.step}")
        if self.diverged:
            code = 1
            why = f"the loss is not finite ({self.loss}) at step {self.step + 1}: stopped before its update"
            how = f"--resume-from step_{self.step} and a lower --lr"
        else:
            code = self.stop.code
            why = f"stopped by {self.stop.reason} after step {self.step}"
            how = "--resume"
        if self.accelerator.is_main_process:
            print(f"\n{why}. The training state after step {self.step} is saved in {path}; to continue, run the "
                  f"same command with {how}", file=sys.stderr, flush=True)
        finish(code)
