"""train.py's configuration as data: ``TrainConfig`` holds every flag as a typed field with its default and help,
``parse_config`` builds the command line from it and checks the values before any process group, file or weight.

Flag ``--seq-length`` is field ``seq_length``. The checks refuse numbers that would run and mislead: a negative
``--lr`` would run gradient ascent under DeepSpeed and exit 0, ``--rope-scaling linear:factor=0`` trains a NaN
model, ``--sp-size 0`` silently means "all ranks". Each refusal names the flag and what to pass instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import torch

from ..attention.registry import REGISTRY
from ..hf import models
from ..memory.layer_groups import GROUP_RECOMPUTE
from ..world.default import PRESETS
from .instructions import INSTRUCTION_COLUMNS, MESSAGES, PROMPT_FORMATS
from .memory_snapshot import check_snapshot_path
from .schedule import SCHEDULES

ALL_LAYERS = -1  # a layer-count flag given without its number (--offload-activations): every layer


def flag(default: typing.Any, help: str, **argparse_options: typing.Any) -> typing.Any:
    """A field with its command-line help and extra ``argparse`` options (choices, nargs, const, metavar)."""
    return field(default=default, metadata={"help": help, **argparse_options})


def default_data_workers() -> int:
    """DataLoader workers by default: 2 on a GPU machine, none on CPU (the CPU is the one computing)."""
    return 2 if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class TrainConfig:
    """Every train.py flag (``--seq-length`` is ``seq_length``), with train.py's defaults."""

    # --- model and data
    model: str = flag(models.TINY, "hub name, local path, shape:llama2-7b (random init) or tiny")
    tiny_preset: str = flag("tiny", "size of the built-in model", choices=list(PRESETS))
    dataset: str = flag("tiny:answers+0.05", "hub name, save_to_disk folder, jsonl/json/parquet file, or tiny "
                         "(tiny:answers: loss on the answers only; tiny:answers+0.05: and on 5% of the other "
                         "tokens; tiny:instructions: generated long instructions). Rows of input_ids, text, or "
                         "instructions (instruction/input/output or chat messages: loss on the responses only)")
    text_column: str = flag("text", "the dataset column holding raw text (a dataset with input_ids uses those)")
    dataset_split: str = flag("train", "the split of a hub dataset")
    prompt_format: str = flag("auto", "instruction data: the tokenizer's chat template (chat), LongAlpaca's "
                               "Llama-2 [INST] prompt (llama2), or auto: chat when the tokenizer has a template, "
                               "else llama2", choices=list(PROMPT_FORMATS))
    one_example_per_row: bool = flag(False, "instruction data: one example per row, right-padded (LongLoRA's "
                                      "way), instead of several packed into a row with position ids restarting "
                                      "at each example")
    ignore_columns: str | None = flag(None, "instruction data: comma-separated columns to leave out (any column "
                                       "besides instruction/input/output or messages is refused otherwise)")
    seq_length: int = flag(256, "tokens per training row")
    # --- parallelism and attention
    backend: str = flag("zigzag_ring", "attention backend; s2attn: LongLoRA's shifted sparse attention "
                         "(training only; contiguous shards)", choices=list(REGISTRY))
    sp_size: int | None = flag(None, "ranks per sequence-parallel group (default: all)")
    ulysses_degree: int | None = flag(None, "usp: Ulysses part of --sp-size (rest: ring)")
    kernel: str | None = flag(None, "attention kernel (default: fastest available)")
    rope_theta: float | None = flag(None, "new RoPE base; default: keep the model's")
    rope_scaling: str | None = flag(None, 'e.g. "yarn:factor=8" or a JSON object; default: keep')
    # --- optimization
    batch_size: int = flag(1, "rows per data-parallel group per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    lr: float = flag(5e-4, "peak learning rate")
    warmup_steps: int = flag(20, "optimizer steps of linear warmup")
    schedule: str = flag("cosine", "learning rate after the warmup", choices=list(SCHEDULES))
    min_lr_ratio: float = flag(0.1, "final learning rate of a decaying schedule, as a fraction of --lr")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm")
    max_steps: int = flag(1000, "optimizer steps")
    seed: int = flag(42, "seed of the model init, data order and PoSE positions")
    # --- output, checkpoints and resume
    output_dir: str = flag("output/default", "where the log, checkpoints and final model go (one run each)")
    checkpoint_every: int = flag(0, "save full training state every N steps (0: off)")
    keep_checkpoints: int = flag(2, "how many of the newest checkpoints to keep")
    resume: bool = flag(False, "continue from the newest complete checkpoint")
    resume_from: str | None = flag(None, "continue from this checkpoint: step_N or a path")
    wandb: str | None = flag(None, "also log to this Weights & Biases project (the log is always in "
                              "OUTPUT_DIR/log.jsonl)")
    # --- memory
    no_gradient_checkpointing: int = flag(0, "activation checkpointing off (N: off for the last N layers only: "
                                           "speed for memory)", nargs="?", const=ALL_LAYERS, metavar="N")
    keep_attention: bool | None = flag(None, "keep each layer's attention output for the checkpoint recompute "
                                        "instead of running attention again (speed for memory; default: on with a "
                                        "CUDA GPU while the kept outputs take at most 1/16 of its memory; "
                                        "--no-keep-attention: off)")
    fuse_pointwise: bool | None = flag(None, "RMSNorm, SwiGLU, RoPE and the loss's softmax as torch.compile'd "
                                        "fused kernels (faster; same math; default: on with a CUDA GPU where the "
                                        "model has them, off on CPU; --no-fuse-pointwise: off)")
    bf16_grads: bool | None = flag(None, "keep the linear weights' gradients in bf16 from the backward to the step "
                                    "(exact: under bf16 autocast they are bf16 numbers; 2 bytes a number instead "
                                    "of 4; default: on for one CUDA process without DeepSpeed or --grad-accum; "
                                    "--no-bf16-grads: off)")
    loss_chunk: int = flag(1024, "tokens per logits chunk of the loss")
    tiled_mlp: int = flag(0, "run MLPs in tiles of N tokens (0: off; DeepSpeed only)")
    offload_activations: int | None = flag(None, "checkpointed inputs of the first N layers (no N: all) wait in "
                                            "pinned host memory (default: on a GPU without DeepSpeed, as many as "
                                            "fit half of the host's free memory; 0: none)", nargs="?",
                                            const=ALL_LAYERS, metavar="N")
    layers_per_checkpoint: int = flag(1, "activation checkpointing keeps the input of every K-th layer only "
                                       "(K times fewer saved or offloaded inputs); the backward recomputes each "
                                       "group of K layers as --group-recompute says", metavar="K")
    group_recompute: str = flag("layer", "with --layers-per-checkpoint K: 'layer' recomputes a group one layer at a "
                                "time (one layer's activations and K-1 inputs on the GPU; K-1 of K layers run "
                                "forward a third time), 'group' all at once (K layers' activations, one forward "
                                "fewer)", choices=GROUP_RECOMPUTE)
    # --- LoRA, PoSE
    lora_rank: int = flag(0, "LoRA+ (LongLoRA): LoRA on attention + trainable embeddings and norms "
                           "(0: full fine-tuning)")
    lora_alpha: float = flag(16.0, "LoRA scale numerator (scale: alpha / rank)")
    lora_keep_adapter: bool = flag(False, "save the adapter instead of merging it")
    pose_target: int | None = flag(None, "PoSE: spread positions over this longer window")
    # --- runs
    no_save: bool = flag(False, "skip the final model (benchmarks)")
    time_limit: float | None = flag(None, "minutes: stop after the step that passes it, then save")
    memory_snapshot: str | None = flag(None, "record the GPU memory of the first two steps (rank 0) and write its "
                                       "snapshot to this new file (for pytorch.org/memory_viz), with a summary of the "
                                       "peak by allocation site in FILE.txt; at an out-of-memory error too",
                                       metavar="FILE")
    data_workers: int = field(default_factory=default_data_workers,
                              metadata={"help": "DataLoader worker processes (default: 2 on GPU, 0 on CPU)"})

    @property
    def model_path(self) -> str:
        """Where the model loads from: ``--model``, or the built-in default's build in the output directory."""
        return os.path.join(self.output_dir, "tiny_init") if self.model == models.TINY else self.model

    @property
    def ignored_columns(self) -> tuple[str, ...]:
        """The column names of ``--ignore-columns``."""
        return tuple(c.strip() for c in (self.ignore_columns or "").split(",") if c.strip())


def flag_name(name: str) -> str:
    """The command-line flag of a config field: ``seq_length`` -> ``--seq-length``."""
    return "--" + name.replace("_", "-")


def value_type(annotation) -> type:
    """``int`` for ``int`` and ``int | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        [annotation] = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` as the manual: the description as written, each flag's default after its help (left out where
    the help already states it, and for flags that default to nothing: None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if "(default" in text or "; default" in text:  # says it in words, e.g. "(default: all)"
            return text
        return f"{text} (default: %(default)s)"


def quiet_on_other_ranks(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``, whose usage errors only rank 0 of a launch prints (every rank parses the same command line);
    the other ranks exit with the same code, 2, silently."""
    if os.environ.get("RANK", "0") != "0":
        parser.error = lambda message: parser.exit(2)  # type: ignore[method-assign]
    return parser


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``TrainConfig``: one ``--flag`` per field, its type, default and help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        options = dict(f.metadata)
        options["help"] = options["help"].replace("%", "%%")  # argparse formats help strings
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = value_type(hints[f.name])
        if kind is bool:  # a flag whose default is None (decided at run time) can also be turned off: --no-...
            options["action"] = argparse.BooleanOptionalAction if default is None else "store_true"
        else:
            options["type"] = kind
        parser.add_argument(flag_name(f.name), default=default, **options)
    return parser


def parse_config(argv: list[str] | None = None, *, description: str | None = None) -> TrainConfig:
    """The checked ``TrainConfig`` of command line ``argv`` (default: ``sys.argv[1:]``); SystemExit for a
    flag that does not parse or a value that makes no sense (``check_config``)."""
    namespace = quiet_on_other_ranks(build_parser(description)).parse_args(argv)
    return check_config(TrainConfig(**vars(namespace)))


def at_least(cfg, name: str, low: int, why: str = "") -> None:
    """SystemExit naming the flag unless ``cfg.<name>`` is None or at least ``low``."""
    value = getattr(cfg, name)
    if value is not None and value < low:
        raise SystemExit(f"{flag_name(name)} must be at least {low}{why}; got {value}")


def finite(cfg, name: str, *, positive: bool = True, example: str = "") -> None:
    """SystemExit naming the flag unless ``cfg.<name>`` is None or a finite number > 0 (>= 0 unless ``positive``)."""
    value = getattr(cfg, name)
    if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise SystemExit(f"{flag_name(name)} must be a finite number {bound}{example}; got {value}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, once checked: SystemExit, naming the flag and a sensible value, for values that make no sense;
    a warning (stderr, rank 0) when ``--checkpoint-every`` is not below ``--max-steps`` (no checkpoint)."""
    finite(cfg, "lr", example=" (e.g. --lr 2e-5)")
    for name in ("max_steps", "batch_size", "grad_accum", "sp_size", "ulysses_degree", "keep_checkpoints",
                 "loss_chunk"):
        at_least(cfg, name, 1)
    at_least(cfg, "seq_length", 2, " (tokens per row: a token and the one it predicts)")
    for name in ("checkpoint_every", "warmup_steps", "tiled_mlp", "lora_rank", "data_workers"):
        at_least(cfg, name, 0, " (0: off)" if name in ("checkpoint_every", "tiled_mlp", "lora_rank") else "")
    at_least(cfg, "layers_per_checkpoint", 1, " (1: every layer its own checkpoint)")
    if cfg.layers_per_checkpoint > 1 and cfg.no_gradient_checkpointing == ALL_LAYERS:
        raise SystemExit(f"--layers-per-checkpoint {cfg.layers_per_checkpoint} groups checkpointed layers, and "
                         "--no-gradient-checkpointing turns checkpointing off: drop one of the two")
    for name in ("offload_activations", "no_gradient_checkpointing"):
        if (getattr(cfg, name) or 0) < ALL_LAYERS:
            raise SystemExit(f"{flag_name(name)} must be at least 0 (a number of layers), or given without a "
                             f"number for all layers; got {getattr(cfg, name)}")
    finite(cfg, "weight_decay", positive=False, example=" (e.g. --weight-decay 0.1)")
    finite(cfg, "max_grad_norm", example=" (e.g. --max-grad-norm 1.0)")
    finite(cfg, "time_limit", example=" (minutes)")
    if cfg.lora_rank:
        finite(cfg, "lora_alpha", example=" (e.g. --lora-alpha 16)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:  # also refuses NaN
        raise SystemExit(f"--min-lr-ratio must be in [0, 1] (the final learning rate as a fraction of --lr); "
                         f"got {cfg.min_lr_ratio}")
    if cfg.pose_target is not None and cfg.pose_target <= cfg.seq_length:
        raise SystemExit(f"--pose-target {cfg.pose_target} must be above --seq-length {cfg.seq_length} (the "
                         "longer window PoSE spreads positions over), or leave it out")
    kept = [c for c in cfg.ignored_columns if c in (*INSTRUCTION_COLUMNS, MESSAGES)]
    if kept:
        raise SystemExit(f"--ignore-columns {','.join(kept)}: the instruction columns "
                         f"({'/'.join(INSTRUCTION_COLUMNS)}, {MESSAGES}) are the data; name only other columns")
    if not 0 <= cfg.seed < 2 ** 32:
        raise SystemExit(f"--seed must be in [0, 2**32 - 1]; got {cfg.seed}")
    try:
        models.check_rope_theta(cfg.rope_theta)
        models.parse_rope_scaling(cfg.rope_scaling)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if cfg.bf16_grads and cfg.grad_accum > 1:
        raise SystemExit(f"--bf16-grads keeps one gradient per step; --grad-accum {cfg.grad_accum} sums several "
                         "(in float32): drop one of the two")
    if cfg.memory_snapshot:
        check_snapshot_path(cfg.memory_snapshot)
    if cfg.checkpoint_every and cfg.checkpoint_every >= cfg.max_steps and os.environ.get("RANK", "0") == "0":
        print(f"warning: --checkpoint-every {cfg.checkpoint_every} is not below --max-steps {cfg.max_steps}: no "
              "checkpoint will be written before the final model", file=sys.stderr)
    return cfg
