"""S²-Attn in a Hugging Face model: sparse shifted groups while training, exact full attention in eval mode."""

from __future__ import annotations

from functools import partial

import torch

from ..attention.registry import Backend
from ..attention.ring import ring_attention
from ..attention.s2attn import DEFAULT_RATIO, LAYOUT, NAME, resolve_group_size, s2_attention
from .attention import register_attention, set_attention_implementation


def register_s2attn(group_size: int | None = None, *, ratio: float = DEFAULT_RATIO, group=None, kernel=None,
                    check: bool = True) -> str:
    """Register S²-Attn with transformers; returns the attn_implementation name ("easy_context_s2attn").

    Modules in training mode run S²-Attn, modules in eval mode exact full causal attention (the ring
    backend over the same ``group``: local when there is none), so ``model.eval()`` is all evaluation needs.
    No mask is built, and what the backends cannot honour (padding, dropout, KV cache, ...) raises, as in
    ``attention.register_attention``. Shard SP inputs in the contiguous layout:
    ``prepare_seq_parallel_inputs("ring", ...)``.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if group_size is not None:  # reject a bad group size now rather than at the first forward
        resolve_group_size(group_size, 1, group_size)
    elif not 0 < ratio <= 1:
        raise ValueError(f"S²-Attn group ratio must be in (0, 1]; got {ratio}")
    sparse_be = Backend(NAME, partial(s2_attention, group_size=group_size, ratio=ratio), LAYOUT)
    name = register_attention(sparse_be, group, kernel, check=check)
    full = ALL_ATTENTION_FUNCTIONS[register_attention(Backend(NAME + "_full", ring_attention, LAYOUT), group,
                                                      kernel, check=check)]
    sparse = ALL_ATTENTION_FUNCTIONS[name]

    def attention(module: torch.nn.Module, *args, **kwargs):
        return (sparse if module.training else full)(module, *args, **kwargs)

    attention.__name__ = name
    AttentionInterface.register(name, attention)
    return name


def apply_s2attn(model, group_size: int | None = None, *, ratio: float = DEFAULT_RATIO, group=None, kernel=None,
                 check: bool = True):
    """Register S²-Attn (``register_s2attn``) and make ``model`` use it; returns the model."""
    name = register_s2attn(group_size, ratio=ratio, group=group, kernel=kernel, check=check)
    set_attention_implementation(model, name, "S²-Attn")
    return model
