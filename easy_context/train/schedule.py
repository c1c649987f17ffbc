"""The learning-rate schedule, from the command line only: linear warmup, then constant, linear or cosine decay.

The trainer sets this value on the optimizer before every optimizer step, so nothing else (a DeepSpeed JSON
scheduler, accelerate's scheduler stepping) can override it; resuming needs only the step count.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def learning_rate(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``max_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)


def set_learning_rate(optimizer, value: float) -> None:
    """Write ``value`` into every parameter group of ``optimizer`` (wrapped optimizers share their groups)."""
    for group in optimizer.param_groups:
        group["lr"] = value
