"""train.py's numeric flags checked right after parsing, before any process group, file or weight: a negative
``--lr`` would run gradient ascent under DeepSpeed and exit 0, ``--rope-scaling linear:factor=0`` trains a NaN
model, ``--sp-size 0`` silently means "all ranks". Each refusal names the flag and what to pass instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..hf import models


def _at_least(args: argparse.Namespace, name: str, low: int, why: str = "") -> None:
    value = getattr(args, name)
    if value is not None and value < low:
        raise SystemExit(f"--{name.replace('_', '-')} must be at least {low}{why}; got {value}")


def _finite(args: argparse.Namespace, name: str, *, positive: bool = True, example: str = "") -> None:
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise SystemExit(f"--{name.replace('_', '-')} must be a finite number {bound}{example}; got {value}")


def check_train_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args``, once checked: SystemExit, naming the flag and a sensible value, for train.py arguments that make
    no sense; a warning (stderr, rank 0) when ``--checkpoint-every`` is not below ``--max-steps`` (no checkpoint)."""
    _finite(args, "lr", example=" (e.g. --lr 2e-5)")
    for name in ("max_steps", "batch_size", "grad_accum", "sp_size", "ulysses_degree", "keep_checkpoints",
                 "loss_chunk"):
        _at_least(args, name, 1)
    _at_least(args, "seq_length", 2, " (tokens per row: a token and the one it predicts)")
    for name in ("checkpoint_every", "warmup_steps", "tiled_mlp", "lora_rank", "data_workers"):
        _at_least(args, name, 0, " (0: off)" if name in ("checkpoint_every", "tiled_mlp", "lora_rank") else "")
    for name in ("offload_activations", "no_gradient_checkpointing"):  # -1 is the flag given without N: all
        if getattr(args, name) < -1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 0 (a number of layers), or given "
                             f"without a number for all layers; got {getattr(args, name)}")
    _finite(args, "weight_decay", positive=False, example=" (e.g. --weight-decay 0.1)")
    _finite(args, "max_grad_norm", example=" (e.g. --max-grad-norm 1.0)")
    _finite(args, "time_limit", example=" (minutes)")
    if args.lora_rank:
        _finite(args, "lora_alpha", example=" (e.g. --lora-alpha 16)")
    if not 0.0 <= args.min_lr_ratio <= 1.0:  # also refuses NaN
        raise SystemExit(f"--min-lr-ratio must be in [0, 1] (the final learning rate as a fraction of --lr); "
                         f"got {args.min_lr_ratio}")
    if args.pose_target is not None and args.pose_target <= args.seq_length:
        raise SystemExit(f"--pose-target {args.pose_target} must be above --seq-length {args.seq_length} (the longer "
                         "window PoSE spreads positions over), or leave it out")
    if not 0 <= args.seed < 2 ** 32:
        raise SystemExit(f"--seed must be in [0, 2**32 - 1]; got {args.seed}")
    try:
        models.check_rope_theta(args.rope_theta)
        models.parse_rope_scaling(args.rope_scaling)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.checkpoint_every and args.checkpoint_every >= args.max_steps and os.environ.get("RANK", "0") == "0":
        print(f"warning: --checkpoint-every {args.checkpoint_every} is not below --max-steps {args.max_steps}: no "
              "checkpoint will be written before the final model", file=sys.stderr)
    return args
