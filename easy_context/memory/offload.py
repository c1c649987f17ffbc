"""Activation-checkpoint offload: with gradient checkpointing on, the tensors each checkpointed layer keeps for
its recompute (its inputs: hidden [B, S_local, H] per layer) wait in pinned host memory from forward to backward.

``OffloadedCheckpoint`` is a drop-in ``gradient_checkpointing_func``: ``torch.utils.checkpoint`` (non-reentrant)
run under saved-tensor hooks, which see exactly what the checkpoint saves outside the layer, its tensor inputs
(the hidden states, and whatever else the transformers version passes positionally).
Forward: each input is copied to pinned host memory on a side CUDA stream once the compute stream has made
it, so the copy overlaps the next layers; the allocator keeps the device block until the copy is done, then
the block is free. Backward: when a layer's recompute asks for one of its inputs, all of that layer's inputs are on their
way back (the compute stream waits for the copy), and the copies of the inputs of the layer checkpointed just
before it (the next one backward reaches) start on the side stream, overlapping this layer's recompute and
backward. Exact: values are copied, never converted.

Parameters are never offloaded (DeepSpeed ZeRO-3 gathers them around module calls, inside the recompute).
Other devices than CUDA GPUs copy synchronously; tensors on the CPU are copied on the CPU (no gain there; it
keeps the code path testable without a GPU).
Host memory: layers x B x S_local x H elements per GPU (at Llama-3-8B's 32 layers and H = 4096, 8 GiB per
32K local tokens in bf16); PyTorch's pinned allocator rounds each block up to a power of two. With layers
checkpointed in groups of k (``layer_groups``), one input per group: k times less.
``check_zero_offload_host`` checks, before loading, that ZeRO-3's offloaded training state fits the host beside them.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .layer_groups import check_layer_groups, decoder_layers, group_checkpointed_layers, group_inputs

Tensor = torch.Tensor


class _Offloaded:
    """A saved tensor's host copy; ``on_device`` holds it back on its device once fetched (until unpacked)."""

    __slots__ = ("host", "device", "ready", "on_device", "unpacked", "call", "__weakref__")

    def __init__(self, host: Tensor, device: torch.device, ready, call: int):
        self.host, self.device, self.ready, self.call = host, device, ready, call
        self.on_device: Tensor | None = None
        self.unpacked = False


class OffloadedCheckpoint:
    """A gradient_checkpointing_func: non-reentrant ``torch.utils.checkpoint`` whose saved inputs wait in host memory.

    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (e.g. ``preserve_rng_state``);
    ``use_reentrant`` must be False (or absent).
    """

    def __init__(self, **checkpoint_kwargs):
        if checkpoint_kwargs.pop("use_reentrant", False):
            raise ValueError("OffloadedCheckpoint runs non-reentrant checkpointing only (use_reentrant=False)")
        self.checkpoint_kwargs = checkpoint_kwargs
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._order: list[weakref.ref] = []  # saved inputs in forward order (dead once backward freed them)
        self._calls = 0  # checkpointed calls so far: the inputs saved by one call are fetched together

    def __call__(self, function: Callable, *args, **kwargs) -> Any:
        if kwargs.pop("use_reentrant", False):
            raise ValueError("OffloadedCheckpoint runs non-reentrant checkpointing only (use_reentrant=False)")
        self._calls += 1
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, use_reentrant=False, **{**self.checkpoint_kwargs, **kwargs})

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: Tensor):
        if isinstance(t, torch.nn.Parameter) or t.numel() == 0:  # torch <= 2.11 also saves checkpoint's empty marker
            return t
        ready = None
        with torch.no_grad():
            if t.is_cuda:
                side = self._side_stream(t.device)
                side.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(side):
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host.copy_(t, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(side)
                t.record_stream(side)  # t's block is not reused before the copy has read it
            else:  # a plain synchronous copy (a CPU tensor is cloned)
                host = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        saved = _Offloaded(host, t.device, ready, self._calls)
        self._order = [r for r in self._order if r() is not None]
        self._order.append(weakref.ref(saved))
        return saved

    def _fetch(self, saved: _Offloaded) -> None:
        """Start copying ``saved`` back to its device on the side stream (after its device-to-host copy)."""
        if saved.on_device is not None:
            return
        if saved.ready is None:  # not CUDA: copy back synchronously (a CPU tensor: no copy)
            saved.on_device = saved.host.to(saved.device)
            return
        # Allocated from the compute stream's pool, where it is used and freed: a block allocated on the side
        # stream would return to the side stream's pool, which the compute stream never reuses (GiBs at 1M).
        side, compute = self._side_stream(saved.device), torch.cuda.current_stream(saved.device)
        on_device = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)
        side.wait_stream(compute)  # the block may be memory that queued compute work still uses
        with torch.cuda.stream(side):
            on_device.copy_(saved.host, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(side)
        on_device.record_stream(side)
        saved.on_device = on_device

    def _fetch_call_of(self, saved: _Offloaded) -> None:
        """Fetch ``saved`` and the other inputs its checkpointed call saved, then those of the nearest earlier
        call that backward has not used yet."""
        live = [s for s in (r() for r in self._order) if s is not None and not s.unpacked]
        for s in live:
            if s.call == saved.call:
                self._fetch(s)
        earlier = [s.call for s in live if s.call < saved.call]
        for s in live:
            if earlier and s.call == max(earlier):
                self._fetch(s)

    def _unpack(self, saved) -> Tensor:
        if not isinstance(saved, _Offloaded):
            return saved
        self._fetch_call_of(saved)
        saved.unpacked = True
        t, saved.on_device = saved.on_device, None
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        return t


def enable_offloaded_checkpointing(model: torch.nn.Module, *, every_n_layers: int = 1, layers: int | None = None,
                                   **checkpoint_kwargs) -> OffloadedCheckpoint:
    """Turn on a transformers model's gradient checkpointing with each checkpointed layer's saved inputs in
    pinned host memory; returns the installed ``OffloadedCheckpoint``. Takes effect in ``model.train()`` mode.

    Call it after anything else that enables checkpointing (a Trainer with ``gradient_checkpointing=True``
    would install plain checkpointing again). ``every_n_layers`` > 1 needs a transformers that supports it.
    ``layers``: offload only the first N checkpointed layers (their inputs wait longest and are needed last,
    so their copies back have the most time to overlap); the rest keep plain checkpointing on the device.
    Use it when host memory cannot hold every layer's input. None: all.
    """
    func = OffloadedCheckpoint(**checkpoint_kwargs)
    _enable_checkpointing(model, every_n_layers)
    # Every transformers 5.x calls `module._gradient_checkpointing_func(...)` in each module that has the
    # `gradient_checkpointing` flag; replace the function it just set, keeping the flags.
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    for m in checkpointed_layers(model)[:layers] if layers is not None else flagged:
        m._gradient_checkpointing_func = func
    if not any(m.gradient_checkpointing is True for m in flagged):
        raise ValueError(f"enable_offloaded_checkpointing: no module of {type(model).__name__} turned gradient "
                         "checkpointing on, so nothing would be offloaded")
    return func


def _enable_checkpointing(model: torch.nn.Module, every_n_layers: int = 1) -> None:
    """transformers' own non-reentrant gradient checkpointing, under either name of its switch."""
    options = {"use_reentrant": False}
    extra = {} if every_n_layers == 1 else {"every_n_layers": every_n_layers}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **extra)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **extra)


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a transformers model checkpoints one by one (its decoder layers), in forward order; not
    an outer module that carries the flag around them."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True
            and not any(c is not m and hasattr(c, "gradient_checkpointing") for c in m.modules())]


def skip_checkpointing(model: torch.nn.Module, last: int) -> list[torch.nn.Module]:
    """Turn gradient checkpointing off for the ``last`` checkpointed layers (0: none), trading their full
    activations (kept from forward to backward) for their recompute; returns those layers. The last layers
    are the ones backward reaches first, so their activations are freed before the others are rebuilt."""
    if last < 0:
        raise ValueError(f"skip_checkpointing: last must be >= 0, got {last}")
    layers = checkpointed_layers(model)
    if last > len(layers):
        raise ValueError(f"skip_checkpointing: the model checkpoints {len(layers)} layers, cannot skip {last}")
    skipped = layers[len(layers) - last:] if last else []
    for m in skipped:
        m.gradient_checkpointing = False
    return skipped


def check_layer_counts(num_layers: int, *, offload: int = 0, skip_last: int = 0, input_bytes: int = 0,
                       layers_per_checkpoint: int = 1, layer_types: list[str] | None = None) -> None:
    """Before any weights load: ``offload`` (-1: all) and ``skip_last`` (-1: no checkpointing at all) must name
    at most ``num_layers`` layers, and offloading needs checkpointing on; ``layers_per_checkpoint`` layers must
    group exactly (``check_layer_groups``; ``layer_types``: the config's). With CUDA and ``input_bytes`` (one
    layer input per GPU), the offloaded inputs (one per group) of this machine's processes must fit its host."""
    for n, what in ((offload, "offload the inputs of"), (skip_last, "leave uncheckpointed")):
        if n > num_layers:
            raise ValueError(f"the model has {num_layers} layers: cannot {what} {n}; choose at most {num_layers}")
    if offload and skip_last < 0:
        raise ValueError("offloading activations needs gradient checkpointing: drop one of the two options")
    check_layer_groups(num_layers, layers_per_checkpoint, skip_last=skip_last, layer_types=layer_types)
    if offload and input_bytes and torch.cuda.is_available():
        check_host_memory(offloaded_inputs(num_layers, offload, layers_per_checkpoint, skip_last), input_bytes,
                          local_processes())


def checkpointed_count(num_layers: int, skip_last: int = 0) -> int:
    """How many of ``num_layers`` run under checkpointing when the last ``skip_last`` do not (-1: none does)."""
    return 0 if skip_last < 0 else max(0, num_layers - skip_last)


def offloaded_inputs(num_layers: int, offload: int, layers_per_checkpoint: int = 1, skip_last: int = 0) -> int:
    """Layer inputs one process keeps in host memory under ``--offload-activations offload`` (-1: every layer) and
    ``--no-gradient-checkpointing skip_last`` (those last layers save no input; -1: none does)."""
    checkpointed = checkpointed_count(num_layers, skip_last)
    layers = checkpointed if offload < 0 else min(offload, checkpointed)
    return group_inputs(layers, layers_per_checkpoint) if offload else 0


def offloaded_input_host_bytes(num_layers: int, offload: int, layers_per_checkpoint: int, input_bytes: int,
                               skip_last: int = 0) -> int:
    """Pinned host bytes of this machine's offloaded layer inputs (``input_bytes`` each, LOCAL_WORLD_SIZE
    processes); 0 without CUDA, where nothing is pinned."""
    if not torch.cuda.is_available():
        return 0
    inputs = offloaded_inputs(num_layers, offload, layers_per_checkpoint, skip_last)
    return inputs * pinned_bytes(input_bytes) * local_processes()


def local_processes() -> int:
    """Processes of this run on this machine (LOCAL_WORLD_SIZE, as torchrun and accelerate set it; else 1)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def pinned_bytes(input_bytes: int) -> int:
    """Pinned host memory one offloaded input takes: PyTorch's pinned allocator rounds blocks up to a power of 2."""
    return 1 << (input_bytes - 1).bit_length() if input_bytes > 1 else input_bytes


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_host_memory(layers: int, input_bytes: int, processes: int, available: int | None = None) -> None:
    """Raise ValueError, saying what to change, unless ``layers`` offloaded inputs of ``input_bytes`` for each of
    ``processes`` fit ``available`` host bytes (default: MemAvailable; no check where unknown)."""
    available = host_available_bytes() if available is None else available
    need = layers * pinned_bytes(input_bytes) * processes
    if available is not None and need > available:
        gib = 2 ** 30
        raise ValueError(
            f"--offload-activations: {layers} layer inputs of {input_bytes / gib:.2f} GiB (pinned as "
            f"{pinned_bytes(input_bytes) / gib:.2f} GiB) for each of {processes} processes need "
            f"{need / gib:.1f} GiB of host memory, and {available / gib:.1f} GiB are available: offload at most "
            f"{available // (pinned_bytes(input_bytes) * processes)} layers (--offload-activations N keeps the rest "
            f"on the GPU), or train on shorter sequences")


# Host bytes per trained parameter that DeepSpeed ZeRO-3 (0.19) keeps with its optimizer offloaded (CPU Adam): its
# flat fp32 gradient buffer spans every parameter whatever ZeRO-Offload++'s "ratio" (GRADIENT_BUFFER_BYTES); the
# offloaded share of the optimizer adds fp32 gradients, fp32 master weights and Adam's two moments (the moments only
# from the first step on); with parameters offloaded, bf16 weights. Measured on the Llama-3-8B shape at ratio 0.5:
# 67.1 GiB used after set-up, 97.5 GiB peak in the first step (this arithmetic: 89.7, and 4-5 for the process).
GRADIENT_BUFFER_BYTES, OPTIMIZER_OFFLOAD_BYTES, PARAM_OFFLOAD_BYTES = 4, 16, 2


def zero_offload_host_bytes(zero: dict, num_params: int, *, lora: bool = False) -> int:
    """Host bytes ZeRO-3 keeps for ``num_params`` parameters under ``zero`` (a DeepSpeed ``zero_optimization``
    dict) over all ranks together; with ``lora`` only the small adapters train, so the optimizer's are left out."""
    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device") in ("cpu", "nvme")  # nvme still stages through pinned host

    # ZeRO-Offload++'s "ratio": the share of the optimizer states on the CPU (the rest stay on the GPU)
    ratio = float((zero.get("offload_optimizer") or {}).get("ratio", 1.0))
    optimizer = GRADIENT_BUFFER_BYTES + OPTIMIZER_OFFLOAD_BYTES * ratio
    optimizer = optimizer if offloaded("offload_optimizer") and not lora else 0
    return int(num_params * (optimizer + (PARAM_OFFLOAD_BYTES if offloaded("offload_param") else 0)))


def check_zero_offload_host(ds_config: dict | None, num_params: int, *, lora: bool = False, activations: int = 0,
                            available: int | None = None) -> None:
    """Before any weights load: ValueError, saying what to change, unless the ZeRO-3 states that ``ds_config``
    offloads (this machine's share of all ranks': LOCAL_WORLD_SIZE / WORLD_SIZE) and ``activations`` (pinned host
    bytes of this machine's offloaded layer inputs) fit ``available`` host bytes together (default MemAvailable;
    no check where unknown or without DeepSpeed)."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    available = host_available_bytes() if available is None else available
    share = local_processes() / int(os.environ.get("WORLD_SIZE", "1"))
    states = zero_offload_host_bytes(zero, num_params, lora=lora) * share
    if available is None or not states or states + activations <= available:
        return
    gib = 2 ** 30
    # the largest optimizer share on the CPU that leaves room for the rest: what the states take at ratio 0
    at_zero = {**zero, "offload_optimizer": {**(zero.get("offload_optimizer") or {}), "ratio": 0.0}}
    room = available - activations - zero_offload_host_bytes(at_zero, num_params, lora=lora) * share
    optimizer = OPTIMIZER_OFFLOAD_BYTES * num_params * share
    ratio = "" if lora or room < optimizer / 100 else f" at most {int(100 * room / optimizer) / 100:.2f}"
    tenants = (f" ({states / gib:.1f} GiB of ZeRO-3 states and {activations / gib:.1f} GiB of offloaded activations)"
               if activations else "")
    raise ValueError(
        f"the DeepSpeed config offloads {num_params / 1e9:.2f}B parameters' training state to this machine's host: "
        f"{(states + activations) / gib:.1f} GiB{tenants}, and {available / gib:.1f} GiB are available "
        f"(with the optimizer offloaded, DeepSpeed's fp32 gradient buffer: {GRADIENT_BUFFER_BYTES} bytes per "
        f"parameter, and {OPTIMIZER_OFFLOAD_BYTES} per parameter of the offloaded share: fp32 weights and gradients, "
        f"Adam's two moments; {PARAM_OFFLOAD_BYTES} more with the parameters offloaded). Keep part of the optimizer "
        f"on the GPU (\"ratio\"{ratio} in offload_optimizer of the DeepSpeed config, as "
        "accelerate_configs/zero3_offload_optimizer.json does), offload fewer activations "
        "(--offload-activations N), spread the states over more GPUs or machines (ZeRO-3 splits them over every "
        "rank), train LoRA adapters (--lora-rank 8), or use a machine with more host memory")


def setup_checkpointing(model: torch.nn.Module, *, offload: int = 0, skip_last: int = 0,
                        layers_per_checkpoint: int = 1, group_recompute: str = "layer") -> None:
    """Gradient checkpointing for a transformers model as the recipe's flags say: ``skip_last`` -1 turns it
    off, N > 0 leaves the last N layers uncheckpointed; ``offload`` N > 0 keeps the first N layers' saved
    inputs in pinned host memory (-1: every layer's), 0 keeps them on the device; ``layers_per_checkpoint`` k > 1
    keeps the input of every k-th checkpointed layer only, each group recomputed as ``group_recompute`` says
    (``layer_groups``)."""
    check_layer_groups(len(decoder_layers(model)), layers_per_checkpoint, skip_last=skip_last,
                       layer_types=getattr(getattr(model, "config", None), "layer_types", None))
    if skip_last < 0:
        return
    if offload:
        enable_offloaded_checkpointing(model, layers=None if offload < 0 else offload)
    else:
        _enable_checkpointing(model)
    skip_checkpointing(model, skip_last)
    group_checkpointed_layers(model, layers_per_checkpoint, group_recompute)
