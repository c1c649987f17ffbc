"""What to change when a step runs out of GPU memory: the memory options a run left unused, each with what it
frees, worked out from the model's sizes and the run's resolved flags, and printed at the error."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator

import torch

from ..hf import models
from ..memory.keep import kept_attention_bytes
from ..memory.layer_groups import group_inputs
from ..memory.offload import local_processes, offloaded_inputs, pinned_bytes
from .config import TrainConfig
from .run_defaults import checkpointed_layer_count, layer_input_bytes

GIB = 2 ** 30
ADAMW_STATE_BYTES = 8  # two float32 moments per parameter
EXPANDABLE = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
UNITS = {"bytes": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": GIB}  # the allocator's format_size, at most 1024 each
SIZE = r"([\d.]+ (?:bytes|KiB|MiB|GiB))"
OUT_OF_MEMORY = re.compile(rf"CUDA out of memory\. Tried to allocate {SIZE}\..*?Of the allocated memory {SIZE} is "
                           rf"allocated by PyTorch, and {SIZE} is reserved by PyTorch but unallocated", re.S)


def memory_options(cfg: TrainConfig, config, *, sp_size: int, deepspeed: bool, processes: int = 1,
                   host_bytes: int | None = None) -> list[str]:
    """One line per option that would lower this run's GPU peak (``cfg``: its flags once resolved), with the GPU
    memory it frees where that follows from the sizes; ``host_bytes``: the host's available memory, if known."""
    layers = config.num_hidden_layers
    k = cfg.layers_per_checkpoint
    checkpointed = checkpointed_layer_count(cfg, layers)
    one_input = layer_input_bytes(cfg, config, sp_size=sp_size, deepspeed=deepspeed)
    saved = group_inputs(checkpointed, k)
    on_gpu = saved - offloaded_inputs(layers, cfg.offload_activations or 0, k, cfg.no_gradient_checkpointing)
    options = []
    if on_gpu:
        host = saved * pinned_bytes(one_input) * local_processes()
        free = "" if host_bytes is None else f", {host_bytes / GIB:.0f} GiB available"
        gpu = on_gpu * one_input / GIB
        options.append(f"--offload-activations: the {on_gpu} layer inputs still on the GPU ({gpu:.1f} GiB) wait in "
                       f"pinned host memory (all of them: {host / GIB:.1f} GiB of host memory{free})")
    if cfg.keep_attention:
        kept = kept_attention_bytes(config, tokens=cfg.batch_size * cfg.seq_length // sp_size, dtype=torch.bfloat16,
                                    layers=checkpointed)
        options.append(f"--no-keep-attention: frees the kept attention outputs ({kept / GIB:.1f} GiB); the "
                       "backward recomputes attention")
    if cfg.no_gradient_checkpointing:
        options.append("--no-gradient-checkpointing 0: checkpoint every layer (a layer left out keeps all its "
                       "activations)")
    if on_gpu and k == 1 and checkpointed > 1:
        half = on_gpu // 2 * one_input / GIB
        options.append(f"--layers-per-checkpoint 2: one input kept per two layers (about {half:.1f} GiB less on the "
                       "GPU; unset, --offload-activations then offloads all or none), for a third forward of every "
                       "other layer")
    if not cfg.tiled_mlp and (deepspeed or processes == 1):
        options.append("--tiled-mlp 4096: the MLP's activations in tiles of 4096 tokens")
    if not deepspeed:
        state = models.parameter_count(config) * ADAMW_STATE_BYTES
        options.append(f"accelerate_configs/zero3_offload_optimizer.yaml: AdamW's state ({state / GIB:.1f} GiB) "
                       "waits in host memory")
    options.append(f"more GPUs per sequence (now {sp_size}; accelerate launch --num_processes P, --sp-size P): each "
                   "holds 1/P of the tokens")
    if "expandable_segments:True" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        options.append(f"{EXPANDABLE}: memory reserved but not allocated (fragments) becomes usable")
    if not cfg.memory_snapshot:
        options.append("--memory-snapshot step.pickle: where the memory goes, by line of code")
    return options


@contextlib.contextmanager
def advice_on_out_of_memory(options: list[str]) -> Iterator[None]:
    """Within the block, a CUDA out-of-memory error first prints ``options`` (stderr; ``fragments_first`` orders
    them by the error), then goes on as it was."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        lines = "\n".join(f"  {o}" for o in fragments_first(options, str(error)))
        print(f"\nThe GPU ran out of memory. What lowers this run's peak:\n{lines}\n", file=sys.stderr, flush=True)
        raise


def fragments_first(options: list[str], message: str) -> list[str]:
    """``options`` with expandable segments first, saying why, when the out-of-memory ``message`` shows more memory
    reserved but unallocated than the allocation asked (fragments, which expandable segments make usable)."""
    sizes = out_of_memory_sizes(message)
    i = next((i for i, o in enumerate(options) if o.startswith(EXPANDABLE + ":")), None)
    if sizes is None or i is None:
        return options
    asked_bytes, held_bytes = size_bytes(sizes[0]), size_bytes(sizes[2])
    if held_bytes < asked_bytes:
        return options
    why = (f"{options[i]}; {held_bytes / GIB:.1f} GiB were reserved but unallocated when {asked_bytes / GIB:.1f} "
           "GiB were asked: this alone may be enough")
    return [why, *options[:i], *options[i + 1:]]


def out_of_memory_sizes(message: str) -> tuple[str, str, str] | None:
    """(asked, allocated, reserved but unallocated) as a CUDA out-of-memory ``message`` writes them ("4.62 GiB"); None
    for any other message."""
    found = OUT_OF_MEMORY.search(message)
    return found.groups() if found else None


def size_bytes(size: str) -> float:
    """Bytes of a size as the CUDA allocator writes it ("896.00 MiB")."""
    number, unit = size.split()
    return float(number) * UNITS[unit]
