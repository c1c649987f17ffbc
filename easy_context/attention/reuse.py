"""Attention outputs reused through the activation-checkpoint recompute: the hook the backends call.

The backends' autograd functions compute their attention through ``reuse_or_compute(compute)``. Inside an
``attention_call_scope`` opened around one attention module's call (the transformers glue in ``easy_context/hf/``
opens it), the first forward stores the (out, lse) it computed and the checkpoint recompute of the same layer gets
those tensors back without computing them again; a later call in the same step computes and stores nothing.
Outside any scope, or for a module whose model has no store attached (``memory.keep.keep_attention_outputs``
attaches one), it is a plain call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

ATTR = "_easy_context_kept_attention"
_active: list[tuple[dict, object]] = []  # (store, key) of the attention call in progress


class KeptOutputs(dict):
    """Per-model store: attention-call key -> (out, lse) from the layer's first forward, until its recompute;
    ``handed_back``: the keys already replayed since the last ``clear``."""

    def __init__(self):
        super().__init__()
        self.handed_back: set = set()

    def clear(self) -> None:
        super().clear()
        self.handed_back.clear()


@contextmanager
def attention_call_scope(module: torch.nn.Module) -> Iterator[None]:
    """Around one attention call of ``module``: lets ``reuse_or_compute`` store or replay its outputs when
    ``module`` belongs to a model with kept outputs, is training, and autograd is recording (no-op otherwise)."""
    store = getattr(module, ATTR, None)
    if store is None or not module.training or not torch.is_grad_enabled():
        yield
        return
    _active.append((store, id(module)))
    try:
        yield
    finally:
        _active.pop()


def reuse_or_compute(compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``compute()``, except inside an open ``attention_call_scope``: the first call per layer computes and stores
    the outputs, the next one (the checkpoint recompute) returns the stored tensors without computing."""
    if not _active:
        return compute()
    store, key = _active[-1]
    if key in store:
        store.handed_back.add(key)
        return store.pop(key)
    outputs = compute()
    # a third call in one step (a nested checkpoint's recompute inside a layer group) has no later call to serve
    if key not in store.handed_back:
        store[key] = tuple(t.detach() for t in outputs)
    return outputs
