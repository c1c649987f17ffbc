"""Flags left unset (None) that are decided once per run, from the model, the lengths, the GPU and the launch."""

from __future__ import annotations

import dataclasses

import torch

from ..memory.keep import keep_by_default, kept_attention_bytes
from .bf16_grads import bf16_grads_blocker
from .config import ALL_LAYERS, TrainConfig


def checkpointed_layer_count(cfg: TrainConfig, num_layers: int) -> int:
    """How many decoder layers run under activation checkpointing with ``cfg``'s flags."""
    skip = cfg.no_gradient_checkpointing
    return 0 if skip == ALL_LAYERS else max(0, num_layers - skip)


def fuses_kernels(cfg: TrainConfig) -> bool:
    """Whether the run compiles fused kernels (RMSNorm, SwiGLU, RoPE, the loss's softmax): ``--fuse-pointwise``, or
    by default with a CUDA GPU."""
    return bool(cfg.fuse_pointwise) or (cfg.fuse_pointwise is None and torch.cuda.is_available())


def resolve_run_defaults(cfg: TrainConfig, config, *, sp_size: int, device_bytes: int | None, deepspeed: bool = False,
                         processes: int = 1) -> TrainConfig:
    """``cfg`` with the flags the command line left unset decided; flags the user gave are kept as they are.

    ``keep_attention``: on a GPU of ``device_bytes`` (None: no GPU) while the outputs its ``sp_size``-rank shard
    keeps take a small share of it (``memory.keep.keep_by_default``), and off where a flag already trades speed for
    memory (layer groups, tiled MLPs; offloaded layer inputs cost no measurable time, so they do not count).
    ``bf16_grads``: on where it is exact and nothing else holds the gradients (a GPU's bf16 autocast, one process,
    no DeepSpeed, no accumulation)."""
    if cfg.bf16_grads is None:
        blocker = bf16_grads_blocker(gpu=device_bytes is not None, deepspeed=deepspeed, processes=processes)
        cfg = dataclasses.replace(cfg, bf16_grads=blocker is None and cfg.grad_accum == 1)
    if cfg.keep_attention is not None:
        return cfg
    if cfg.layers_per_checkpoint > 1 or cfg.tiled_mlp:
        return dataclasses.replace(cfg, keep_attention=False)
    tokens = cfg.batch_size * cfg.seq_length // sp_size
    kept = kept_attention_bytes(config, tokens=tokens, dtype=torch.bfloat16,
                                layers=checkpointed_layer_count(cfg, config.num_hidden_layers))
    return dataclasses.replace(cfg, keep_attention=keep_by_default(kept, device_bytes))
