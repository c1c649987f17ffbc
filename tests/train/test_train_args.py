"""train_args.py: train.py's numeric flags that make no sense are refused (or warned about) before anything loads."""

from __future__ import annotations

import argparse

import pytest

from easy_context.train.train_args import check_train_args

# train.py's defaults (its argparse), as check_train_args sees them after parse_args.
DEFAULTS = dict(model="tiny", dataset="tiny", seq_length=1024, backend="zigzag_ring", sp_size=None,
                ulysses_degree=None, rope_theta=None, rope_scaling=None, batch_size=1, grad_accum=1, lr=2e-5,
                warmup_steps=0, schedule="constant", min_lr_ratio=0.0, weight_decay=0.1, max_grad_norm=1.0,
                max_steps=100, seed=42, checkpoint_every=0, keep_checkpoints=2, no_gradient_checkpointing=0,
                loss_chunk=1024, tiled_mlp=0, offload_activations=0, lora_rank=0, lora_alpha=16.0, pose_target=None,
                time_limit=None, data_workers=0)


def args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**DEFAULTS, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=-2e-5), "--lr must be a finite number > 0"),
    (dict(lr=0.0), "--lr must be a finite number > 0"),
    (dict(lr=float("nan")), "--lr must be a finite number > 0"),
    (dict(max_steps=0), "--max-steps must be at least 1"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(grad_accum=0), "--grad-accum must be at least 1"),
    (dict(sp_size=0), "--sp-size must be at least 1"),
    (dict(ulysses_degree=0), "--ulysses-degree must be at least 1"),
    (dict(seq_length=0), "--seq-length must be at least 2"),
    (dict(seq_length=-1024), "--seq-length must be at least 2"),
    (dict(checkpoint_every=-5), "--checkpoint-every must be at least 0"),
    (dict(warmup_steps=-1), "--warmup-steps must be at least 0"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be at least 1"),
    (dict(loss_chunk=0), "--loss-chunk must be at least 1"),
    (dict(tiled_mlp=-4096), "--tiled-mlp must be at least 0"),
    (dict(lora_rank=-8), "--lora-rank must be at least 0"),
    (dict(lora_rank=8, lora_alpha=float("inf")), "--lora-alpha must be a finite number > 0"),
    (dict(weight_decay=-0.1), "--weight-decay must be a finite number >= 0"),
    (dict(min_lr_ratio=1.5), r"--min-lr-ratio must be in \[0, 1\]"),
    (dict(min_lr_ratio=-0.1), r"--min-lr-ratio must be in \[0, 1\]"),
    (dict(max_grad_norm=0.0), "--max-grad-norm must be a finite number > 0"),
    (dict(time_limit=0.0), "--time-limit must be a finite number > 0"),
    (dict(time_limit=-10.0), "--time-limit must be a finite number > 0"),
    (dict(pose_target=1024), "--pose-target .* must be above --seq-length 1024"),
    (dict(pose_target=512), "--pose-target .* must be above --seq-length 1024"),
    (dict(data_workers=-1), "--data-workers must be at least 0"),
    (dict(offload_activations=-3), "--offload-activations must be at least 0"),
    (dict(no_gradient_checkpointing=-2), "--no-gradient-checkpointing must be at least 0"),
    (dict(seed=-1), r"--seed must be in \[0, 2\*\*32 - 1\]"),
    (dict(rope_theta=float("nan")), "--rope-theta must be a finite number > 0"),
    (dict(rope_scaling="linear:factor=0"), "factor must be a finite number >= 1"),
    (dict(rope_scaling="yarn:factor=-4"), "factor must be a finite number >= 1"),
])
def test_nonsense_numbers_are_refused_with_the_flag_named(overrides, message):
    with pytest.raises(SystemExit, match=message):
        check_train_args(args(**overrides))


def test_sensible_arguments_pass_and_checkpoints_that_never_come_are_a_warning(capsys):
    good = args()
    assert check_train_args(good) is good
    check_train_args(args(lr=1e-3, pose_target=4096, time_limit=0.5, offload_activations=-1, min_lr_ratio=1.0,
                          no_gradient_checkpointing=-1, checkpoint_every=50, warmup_steps=200, weight_decay=0.0))
    assert capsys.readouterr().err == ""
    check_train_args(args(max_steps=10, checkpoint_every=20))
    assert "--checkpoint-every 20 is not below --max-steps 10: no checkpoint" in capsys.readouterr().err
