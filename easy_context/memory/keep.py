"""Keep each layer's attention output through the activation-checkpoint recompute instead of rerunning it.

With gradient checkpointing every layer's forward runs twice: once in the forward pass, once more in the
backward pass to rebuild what the backward needs. At long lengths attention dominates that recompute
(and with a ring it repeats every send and receive). ``keep_attention_outputs(model)`` stores each attention
call's (out, lse) on its first forward and hands the same tensors back when the recompute reaches it, so
the recompute rebuilds only q, k and v (cheap projections) and the backward then runs as usual from the
kept out and lse. Exact: the recompute of a checkpointed layer is deterministic, so its q, k, v equal
the first forward's. The cost is one attention output (and float32 lse) per layer kept alive from
forward to backward: ``[B, S_local, H * D]`` in the model dtype, 0.5 GiB per layer per GPU for a 7B model
at 64K local tokens.

The backends' autograd functions call ``kept(compute)`` around their attention computation; the HF glue
opens a slot for each attention module's call (``slot``) when the model has a store attached.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

ATTR = "_easy_context_kept_attention"
_active: list[tuple[dict, object]] = []  # (store, key) of the attention call in progress


class KeptOutputs(dict):
    """Per-model store: attention-call key -> (out, lse) from the layer's first forward, until its recompute."""


@contextmanager
def slot(module: torch.nn.Module) -> Iterator[None]:
    """Around one attention call of ``module``: lets ``kept`` store or replay its outputs when ``module``
    belongs to a model with kept outputs, is training, and autograd is recording (no-op otherwise)."""
    store = getattr(module, ATTR, None)
    if store is None or not module.training or not torch.is_grad_enabled():
        yield
        return
    _active.append((store, id(module)))
    try:
        yield
    finally:
        _active.pop()


def kept(compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``compute()``, except inside an open ``slot``: the first call per layer computes and stores the
    outputs, the next one (the checkpoint recompute) returns the stored tensors without computing."""
    if not _active:
        return compute()
    store, key = _active[-1]
    if key in store:
        return store.pop(key)
    outputs = compute()
    store[key] = tuple(t.detach() for t in outputs)
    return outputs


def keep_attention_outputs(model: torch.nn.Module) -> KeptOutputs:
    """Make ``model``'s easy_context attention keep its outputs through the checkpoint recompute; returns the
    store. Each forward of ``model`` or of its decoder body (``base_model``, what the chunked loss calls)
    starts with an empty store, so a forward that was never backpropagated (evaluation with grad on, an
    exception) leaves nothing stale behind; the recompute reruns single layers and never clears it."""
    store = KeptOutputs()
    for m in model.modules():
        setattr(m, ATTR, store)
    for entry in {id(model): model, id(model.base_model): model.base_model}.values():
        entry.register_forward_pre_hook(lambda *_: store.clear())
    return store
