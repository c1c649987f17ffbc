"""config.py: train.py's flags parse into a TrainConfig (typed, with defaults and help), and flags that make no
sense are refused (or warned about) before anything loads; all in process, nothing launched."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from easy_context.train.config import ALL_LAYERS, TrainConfig, build_parser, check_config, parse_config


def config(**overrides) -> TrainConfig:
    """train.py's defaults with ``overrides``, as check_config sees them after parsing."""
    return TrainConfig(**{"data_workers": 0, **overrides})


def test_the_defaults_are_train_pys_and_flags_land_in_typed_fields():
    cfg = parse_config([])
    assert (cfg.model, cfg.dataset, cfg.seq_length, cfg.backend, cfg.sp_size, cfg.lr) == (
        "tiny", "tiny:answers+0.05", 256, "zigzag_ring", None, 5e-4)
    assert (cfg.max_steps, cfg.seed, cfg.output_dir, cfg.resume, cfg.offload_activations) == (
        1000, 42, "output/default", False, None)
    cfg = parse_config(["--seq-length", "256", "--backend", "usp", "--ulysses-degree", "2", "--lr", "1e-3",
                        "--rope-theta", "1e7", "--resume", "--offload-activations", "--no-gradient-checkpointing",
                        "3", "--time-limit", "0.5", "--dataset", "tiny:answers+0.05"])
    assert (cfg.seq_length, cfg.backend, cfg.ulysses_degree, cfg.lr, cfg.rope_theta) == (256, "usp", 2, 1e-3, 1e7)
    assert isinstance(cfg.seq_length, int) and isinstance(cfg.rope_theta, float)
    assert cfg.resume and cfg.offload_activations == ALL_LAYERS and cfg.no_gradient_checkpointing == 3
    assert (cfg.time_limit, cfg.dataset) == (0.5, "tiny:answers+0.05")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # configuration is data: fixed once parsed


@pytest.mark.parametrize("argv, value", [([], None), (["--fuse-pointwise"], True), (["--no-fuse-pointwise"], False)])
def test_pointwise_fusion_is_decided_at_run_time_unless_a_flag_says(argv, value):
    assert parse_config(argv).fuse_pointwise is value  # None: on with a CUDA GPU (train.py)


def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(TrainConfig)}
    for a in flags.values():  # a flag decided at run time by default (None) can also be turned off
        name = a.dest.replace("_", "-")
        assert a.help and a.option_strings == (["--" + name, "--no-" + name] if a.default is None and
                                               isinstance(a, argparse.BooleanOptionalAction) else ["--" + name])
    assert "5%" in parser.format_help()  # help strings are taken as written


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nope"], "invalid choice: 'nope'"),
    (["--seq-length", "1k"], "invalid int value: '1k'"),
    (["--schedule", "step"], "invalid choice: 'step'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_flags_that_do_not_parse_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-0.001"], "--lr must be a finite number > 0"),
    (["--sp-size", "0"], "--sp-size must be at least 1"),
    (["--seq-length", "512", "--pose-target", "512"], "--pose-target .* must be above --seq-length 512"),
    (["--rope-scaling", "linear:factor=0"], "factor must be a finite number >= 1"),
])
def test_parse_config_checks_the_values(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(argv)


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
    (dict(pose_target=256), "--pose-target .* must be above --seq-length 256"),
    (dict(pose_target=128), "--pose-target .* must be above --seq-length 256"),
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
        check_config(config(**overrides))


def test_sensible_arguments_pass_and_checkpoints_that_never_come_are_a_warning(capsys):
    good = config()
    assert check_config(good) is good
    check_config(config(lr=1e-3, pose_target=4096, time_limit=0.5, offload_activations=-1, min_lr_ratio=1.0,
                        no_gradient_checkpointing=-1, checkpoint_every=50, warmup_steps=200, weight_decay=0.0))
    assert capsys.readouterr().err == ""
    check_config(config(max_steps=10, checkpoint_every=20))
    assert "--checkpoint-every 20 is not below --max-steps 10: no checkpoint" in capsys.readouterr().err


def test_instruction_data_flags_parse_and_instruction_columns_cannot_be_ignored(capsys):
    cfg = parse_config([])
    assert (cfg.prompt_format, cfg.one_example_per_row, cfg.ignored_columns) == ("auto", False, ())
    cfg = parse_config(["--dataset", "long.json", "--prompt-format", "llama2", "--one-example-per-row",
                        "--ignore-columns", "file, id"])
    assert (cfg.prompt_format, cfg.one_example_per_row, cfg.ignored_columns) == ("llama2", True, ("file", "id"))
    with pytest.raises(SystemExit) as e:
        parse_config(["--prompt-format", "alpaca"])
    assert e.value.code == 2 and "invalid choice: 'alpaca'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--ignore-columns output: the instruction columns .* are the data"):
        parse_config(["--ignore-columns", "file,output"])


def test_usage_errors_are_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # every rank parses the same command line under a launcher
    with pytest.raises(SystemExit) as e:
        parse_config(["--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        parse_config(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_help_shows_defaults_unless_the_help_says_it_or_there_is_none():
    text = " ".join(build_parser().format_help().split())
    assert f"tokens per training row (default: {TrainConfig().seq_length})" in text
    assert "--sp-size SP_SIZE ranks per sequence-parallel group (default: all)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_layers_per_checkpoint_is_at_least_1_and_needs_checkpointing():
    assert parse_config([]).layers_per_checkpoint == 1  # every layer its own checkpoint
    assert parse_config(["--layers-per-checkpoint", "4", "--no-gradient-checkpointing", "2"]).layers_per_checkpoint == 4
    with pytest.raises(SystemExit, match="--layers-per-checkpoint must be at least 1"):
        check_config(config(layers_per_checkpoint=0))
    with pytest.raises(SystemExit, match="--layers-per-checkpoint 4 groups checkpointed layers, and "
                                         "--no-gradient-checkpointing turns checkpointing off"):
        check_config(config(layers_per_checkpoint=4, no_gradient_checkpointing=ALL_LAYERS))
    check_config(config(no_gradient_checkpointing=ALL_LAYERS))  # 1 with checkpointing off: nothing to group
