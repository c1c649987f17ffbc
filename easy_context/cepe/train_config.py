"""train_cepe.py's configuration as data: ``CEPETrainConfig`` holds every flag (``--context-chunks`` is field
``context_chunks``) with its default and help; ``parse_cepe_config`` builds the command line from it and refuses
nonsense numbers before any process group, file or weight. What needs the decoder's config (its family, widths,
position limit) is checked from that config alone, before its weights load (``config.resolve_config``,
``config.check_lengths``, ``config.check_teacher``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass

from ..attention.registry import REGISTRY
from ..hf import models
from ..train.config import (HelpFormatter, at_least, default_data_workers, finite, flag, flag_name,
                            value_type, quiet_on_other_ranks)
from ..train.schedule import SCHEDULES
from ..world.default import PRESETS
from .config import INIT_MODES, STAGES, CEPEConfig, config_from_encoder_file
from .distill import DEFAULT_TOPK, RESTS

# Exact backends only: the decoder window's attention is sequence-parallel or each rank's whole.
DECODER_BACKENDS = [name for name, b in REGISTRY.items() if b.exact]


@dataclass(frozen=True)
class CEPETrainConfig:
    """Every train_cepe.py flag, with its defaults."""

    # --- the frozen decoder, or a CEPE model to go on training
    model: str = flag(models.TINY, "the frozen decoder: local path, hub name, or tiny (the built-in model, "
                       "untrained: a smoke test)")
    tiny_preset: str = flag("tiny", "size of the built-in model", choices=list(PRESETS))
    cepe: str | None = flag(None, "go on from this saved CEPE model (e.g. the warmup stage's OUTPUT/model): its "
                             "decoder, shape and weights; the shape flags below are then ignored")
    # --- CEPE shape
    chunk_size: int = flag(256, "tokens per encoder chunk (each encoded on its own)")
    encoder_layers: int = flag(4, "encoder layers")
    encoder_hidden_size: int | None = flag(None, "encoder width (default: a quarter of the decoder's, 256 to "
                                            "the decoder's)")
    encoder_heads: int | None = flag(None, "encoder attention heads (default: width / 64)")
    encoder_kv_heads: int | None = flag(None, "encoder key/value heads (default: as many as heads)")
    encoder_intermediate_size: int | None = flag(None, "encoder MLP width (default: 4 x its width)")
    encoder_config: str | None = flag(None, "a Llama config.json (or its folder) giving the encoder's shape")
    cross_layers: int | None = flag(None, "cross-attention in this many last decoder layers (default: all)")
    init: str = flag("copy", "cross-attention init: copy the layer's self-attention (k/v sliced) and post-"
                      "attention norm, normal, or zero (normal with a zero output projection)", choices=INIT_MODES)
    # --- data
    stage: str = flag("main", "warmup: the encoder reads the decoder's own window; main: the encoder reads the "
                       "context before it", choices=STAGES)
    window: int = flag(256, "decoder tokens per row (the loss is on these)")
    context_chunks: int = flag(16, "main stage: encoder chunks of context before the window")
    dataset: str = flag("tiny:answers+0.05", "hub name, save_to_disk folder, jsonl/parquet file, tiny (the built-in "
                         "retrieval text; tiny:answers+F: loss on the answers and a fraction F of the rest), or "
                         "random; rows of context + window tokens")
    text_column: str = flag("text", "the dataset column holding raw text")
    dataset_split: str = flag("train", "the split of a hub dataset")
    # --- CEPED distillation
    kl_coef: float = flag(0.0, "weight of the KL to the teacher's top-k (0: no distillation)")
    lm_coef: float = flag(1.0, "weight of the cross entropy on the decoder's tokens")
    kl_topk: int = flag(DEFAULT_TOPK, "teacher probabilities kept per position")
    kl_rest: str = flag("bucket", "the probability mass outside the top-k: one more KL bucket, or drop it",
                         choices=RESTS)
    teacher: str | None = flag(None, "the teacher (reads context + window in full; default: the decoder itself)")
    # --- parallelism
    backend: str = flag("data_parallel", "the decoder window's attention: data_parallel (each rank whole rows), "
                         "or a sequence-parallel backend: the window is split over --sp-size ranks, and so are the "
                         "encoder chunks", choices=DECODER_BACKENDS)
    sp_size: int | None = flag(None, "ranks per sequence-parallel group (default: all)")
    ulysses_degree: int | None = flag(None, "usp: Ulysses part of --sp-size (rest: ring)")
    kernel: str | None = flag(None, "attention kernel (default: fastest available)")
    # --- optimization
    batch_size: int = flag(1, "rows per data-parallel group per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    lr: float = flag(3e-4, "peak learning rate (the paper: 5e-4 warmup, 3e-4 main)")
    warmup_steps: int = flag(20, "optimizer steps of linear warmup")
    schedule: str = flag("cosine", "learning rate after the warmup", choices=list(SCHEDULES))
    min_lr_ratio: float = flag(0.1, "final learning rate of a decaying schedule, as a fraction of --lr")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm")
    max_steps: int = flag(1000, "optimizer steps")
    seed: int = flag(42, "seed of the encoder and cross-attention init and of the data order")
    # --- output, checkpoints and resume
    output_dir: str = flag("output/cepe", "where the log, checkpoints and final model go (one run each)")
    checkpoint_every: int = flag(0, "save full training state every N steps (0: off)")
    keep_checkpoints: int = flag(2, "how many of the newest checkpoints to keep")
    resume: bool = flag(False, "continue from the newest complete checkpoint")
    resume_from: str | None = flag(None, "continue from this checkpoint: step_N or a path")
    wandb: str | None = flag(None, "also log to this Weights & Biases project")
    save_decoder: bool = flag(False, "also write the frozen decoder's weights into OUTPUT/model")
    # --- memory and runs
    no_gradient_checkpointing: bool = flag(False, "activation checkpointing off (decoder and encoder layers)")
    loss_chunk: int = flag(1024, "tokens per logits chunk of the loss")
    no_save: bool = flag(False, "skip the final model (benchmarks)")
    time_limit: float | None = flag(None, "minutes: stop after the step that passes it, then save")
    data_workers: int = dataclasses.field(default_factory=default_data_workers, metadata={
        "help": "DataLoader worker processes (default: 2 on GPU, 0 on CPU)"})

    @property
    def model_path(self) -> str:
        """Where the decoder loads from: ``--model``, or the built-in default's build in the output directory."""
        return os.path.join(self.output_dir, "tiny_init") if self.model == models.TINY else self.model


def cepe_config(cfg: CEPETrainConfig) -> CEPEConfig:
    """The CEPE fields the flags ask for (``--encoder-config`` giving the encoder's shape when set)."""
    out = CEPEConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(CEPEConfig) if hasattr(cfg, f.name)})
    return config_from_encoder_file(out, cfg.encoder_config) if cfg.encoder_config else out


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``CEPETrainConfig``: one ``--flag`` per field, its type, default and help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(CEPETrainConfig)
    for f in dataclasses.fields(CEPETrainConfig):
        options = dict(f.metadata)
        options["help"] = options["help"].replace("%", "%%")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = value_type(hints[f.name])
        if kind is bool:
            options["action"] = "store_true"
        else:
            options["type"] = kind
        parser.add_argument(flag_name(f.name), default=default, **options)
    return parser


def parse_cepe_config(argv: list[str] | None = None, *, description: str | None = None) -> CEPETrainConfig:
    """The checked ``CEPETrainConfig`` of command line ``argv`` (default: ``sys.argv[1:]``); SystemExit for a flag
    that does not parse or a value that makes no sense (``check_cepe_train_config``)."""
    namespace = quiet_on_other_ranks(build_parser(description)).parse_args(argv)
    return check_cepe_train_config(CEPETrainConfig(**vars(namespace)))


def check_cepe_train_config(cfg: CEPETrainConfig) -> CEPETrainConfig:
    """``cfg``, once checked: SystemExit naming the flag and a sensible value for numbers that make no sense."""
    finite(cfg, "lr", example=" (e.g. --lr 3e-4)")
    for name in ("max_steps", "batch_size", "grad_accum", "sp_size", "ulysses_degree", "keep_checkpoints",
                 "loss_chunk", "chunk_size", "window", "context_chunks", "encoder_layers", "kl_topk",
                 "encoder_hidden_size", "encoder_heads", "encoder_kv_heads", "encoder_intermediate_size",
                 "cross_layers"):
        at_least(cfg, name, 1)
    for name in ("checkpoint_every", "warmup_steps", "data_workers"):
        at_least(cfg, name, 0)
    for name in ("weight_decay", "kl_coef", "lm_coef"):
        finite(cfg, name, positive=False)
    finite(cfg, "max_grad_norm", example=" (e.g. --max-grad-norm 1.0)")
    finite(cfg, "time_limit", example=" (minutes)")
    if cfg.kl_coef == 0 and cfg.lm_coef == 0:
        raise SystemExit("--lm-coef and --kl-coef are both 0: nothing to train on; give one of them a weight")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0 or math.isnan(cfg.min_lr_ratio):
        raise SystemExit(f"--min-lr-ratio must be in [0, 1]; got {cfg.min_lr_ratio}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise SystemExit(f"--seed must be in [0, 2**32 - 1]; got {cfg.seed}")
    if cfg.cepe is not None and not os.path.isdir(cfg.cepe):
        raise SystemExit(f"--cepe {cfg.cepe!r} is not a directory: give a saved CEPE model (train_cepe.py's "
                         "OUTPUT/model)")
    return cfg
