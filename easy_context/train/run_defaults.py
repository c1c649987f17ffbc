"""Flags left unset (None) that are decided once per run, from the model, the lengths, the GPU and the launch."""

from __future__ import annotations

import dataclasses

import torch

from ..memory.keep import keep_by_default, kept_attention_bytes
from ..memory.offload import checkpointed_count, local_processes, offloaded_inputs, pinned_bytes
from .bf16_grads import bf16_grads_blocker
from .config import ALL_LAYERS, TrainConfig


def checkpointed_layer_count(cfg: TrainConfig, num_layers: int) -> int:
    """How many decoder layers run under activation checkpointing with ``cfg``'s flags."""
    return checkpointed_count(num_layers, cfg.no_gradient_checkpointing)


# Offloaded layer inputs, left to the defaults, take at most this share of the host's available memory (pinned
# pages the page cache, data workers and checkpoint saves can no longer use). Half lets the Qwen2.5-7B shape at 128K
# offload all 28 inputs (56 GiB pinned) on one H200's 125 GiB host, where its step then peaked at 58.2 GiB of host
# and 132.9 of the GPU's 139.8 GiB; a quarter would keep 13 of them (23 GiB) on the GPU.
HOST_SHARE = 1 / 2


def layer_input_bytes(cfg: TrainConfig, config, *, sp_size: int, deepspeed: bool) -> int:
    """Bytes of one decoder layer's input on a rank, which checkpointing keeps or offloading moves to the host: bf16
    under DeepSpeed, float32 residuals under autocast otherwise, over ``sp_size`` sequence ranks."""
    return (2 if deepspeed else 4) * config.hidden_size * cfg.batch_size * cfg.seq_length // sp_size


def default_offload(cfg: TrainConfig, num_layers: int, input_bytes: int, host_bytes: int) -> int:
    """``--offload-activations``' default with ``host_bytes`` available: every checkpointed layer (ALL_LAYERS) if
    their inputs fit ``HOST_SHARE`` of it, else the most first layers that do (groups of layers: all or none)."""
    budget = int(host_bytes * HOST_SHARE) // (pinned_bytes(input_bytes) * local_processes())
    checkpointed = checkpointed_layer_count(cfg, num_layers)
    if offloaded_inputs(num_layers, ALL_LAYERS, cfg.layers_per_checkpoint, cfg.no_gradient_checkpointing) <= budget:
        return ALL_LAYERS if checkpointed else 0
    return min(budget, checkpointed) if cfg.layers_per_checkpoint == 1 else 0


def fuses_kernels(cfg: TrainConfig) -> bool:
    """Whether the run compiles fused kernels (RMSNorm, SwiGLU, RoPE, the loss's softmax): ``--fuse-pointwise``, or
    by default with a CUDA GPU."""
    return bool(cfg.fuse_pointwise) or (cfg.fuse_pointwise is None and torch.cuda.is_available())


def resolve_run_defaults(cfg: TrainConfig, config, *, sp_size: int, device_bytes: int | None, deepspeed: bool = False,
                         processes: int = 1, host_bytes: int | None = None) -> TrainConfig:
    """``cfg`` with the flags the command line left unset decided; flags the user gave are kept as they are.

    ``keep_attention``: on a GPU of ``device_bytes`` (None: no GPU) while the outputs its ``sp_size``-rank shard
    keeps take a small share of it (``memory.keep.keep_by_default``), and off where a flag already trades speed for
    memory (layer groups, tiled MLPs; offloaded layer inputs cost no measurable time, so they do not count).
    ``bf16_grads``: on where it is exact and nothing else holds the gradients (a GPU's bf16 autocast, one process,
    no DeepSpeed, no accumulation).
    ``offload_activations``: on a GPU without DeepSpeed, as many checkpointed layer inputs as fit a share of the
    host's ``host_bytes`` available (``default_offload``; None: unknown, none), since they cost no measurable time;
    DeepSpeed's own offloads budget the host under its configs."""
    if cfg.offload_activations is None:
        on = device_bytes is not None and not deepspeed and host_bytes is not None
        offload = default_offload(cfg, config.num_hidden_layers, layer_input_bytes(
            cfg, config, sp_size=sp_size, deepspeed=deepspeed), host_bytes) if on else 0
        cfg = dataclasses.replace(cfg, offload_activations=offload)
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
