"""RoPE whose frequencies depend on the sequence length (dynamic NTK, LongRoPE), exact under sequence parallelism.

transformers picks these frequencies in every forward from ``max(position_ids) + 1`` (its ``dynamic_rope_update``
decorator on the rotary embedding). A sequence-parallel rank holds only its shard's positions, so each rank would
rotate with the frequencies of its own shard's reach: different from the other ranks and from the one-process model
(up to 0.8 relative gradient error with the loss still agreeing to 1e-5). ``follow_sequence_length`` makes every
such rotary embedding pick them from the largest position of the whole sequence instead (``global_max`` of the
local one: an all-reduce over the SP group), which is what the one-process model sees.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

Tensor = torch.Tensor
_WRAPPED = "_easy_context_follows_sequence_length"


def length_dependent(rope_type) -> bool:
    """Whether a rope type (a rotary module's ``rope_type``: a name or {layer type: name}) picks its frequencies
    from the sequence length in each forward, as transformers' dynamic-NTK and LongRoPE do."""
    kinds = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any(isinstance(k, str) and ("dynamic" in k or k == "longrope") for k in kinds)


def config_length_dependent(config) -> list[str]:
    """The rope types in ``config.rope_parameters`` (one setting, or one per layer type) that depend on the
    sequence length."""
    rope = getattr(config, "rope_parameters", None) or {}
    settings = [rope] if "rope_type" in rope or "type" in rope else [v for v in rope.values() if isinstance(v, dict)]
    kinds = {s.get("rope_type", s.get("type")) for s in settings}
    return sorted(k for k in kinds if length_dependent(k))


def _following(decorated, raw, global_max: Callable[[Tensor], Tensor]):
    def forward(self, x: Tensor, position_ids: Tensor, *args, **kwargs):
        top = global_max(position_ids.max())
        # transformers' decorator sets the frequencies from max(positions) + 1: hand it the whole sequence's
        # largest position (one per row, a cheap call whose cos/sin are dropped), then rotate the real positions
        # with them, past the decorator (which would re-pick them from this shard's positions).
        decorated(self, x, top.expand(*position_ids.shape[:-1], 1), *args, **kwargs)
        return raw(self, x, position_ids, *args, **kwargs)

    return forward


def _below_dynamic_rope_update(forward) -> Callable | None:
    """The function transformers' ``dynamic_rope_update`` wraps in ``forward``'s chain of decorators (other
    wrappers, such as ``torch.no_grad()`` in some versions, may sit above it); None if it is not in the chain."""
    while forward is not None:
        source = getattr(getattr(forward, "__code__", None), "co_filename", "")
        inner = getattr(forward, "__wrapped__", None)
        if source.endswith("modeling_rope_utils.py"):
            return inner
        forward = inner
    return None


def follow_sequence_length(model: torch.nn.Module, global_max: Callable[[Tensor], Tensor]) -> int:
    """Make every rotary embedding of ``model`` with a length-dependent rope type pick its frequencies from
    ``global_max(max of this call's position ids)``; returns how many rotary embeddings follow it (already
    wrapped ones included). Only transformers' ``dynamic_rope_update`` rotary embeddings can be wrapped."""
    count = 0
    for module in model.modules():
        if not length_dependent(getattr(module, "rope_type", None)):
            continue
        if getattr(module, _WRAPPED, False):
            count += 1
            continue
        decorated = type(module).forward
        raw = _below_dynamic_rope_update(decorated)
        if raw is None:
            continue  # not transformers' dynamic_rope_update
        module.forward = types.MethodType(_following(decorated, raw, global_max), module)
        setattr(module, _WRAPPED, True)
        count += 1
    return count
