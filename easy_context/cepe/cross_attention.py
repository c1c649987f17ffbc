"""CEPE's cross-attention block: decoder states attend to the encoder's memory (its own pre-norm, queries from the
decoder, keys and values projected up from the encoder's width, no RoPE, not causal, memory padding masked out).

Its heads are the decoder layer's (count and width), so ``init_cross_attention`` can start it as a copy of the
layer's self-attention (key/value weights sliced to the encoder's width) and of its post-attention norm, or with
normal weights and, for "zero", a zero output projection (the wrapped decoder then starts as the decoder itself).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from .sharded import QUERY_MODES, memory_attention

Tensor = torch.Tensor


@dataclass(frozen=True)
class Memory:
    """What the cross-attention reads: encoder ``states`` [B, M, De] (this rank's chunks when spread over
    ``group``), ``mask`` [B, M] (True: a real token; None: all real), the SP ``group`` holding the rest of the
    memory (None: all here) and whether the decoder ``queries`` are the same on every rank of it ("replicated") or
    each rank's own shard ("sharded"); the attention ``kernel`` (None: fastest available)."""

    states: Tensor
    mask: Tensor | None = None
    group: Any = None
    queries: str = "replicated"
    kernel: str | None = None

    def __post_init__(self):
        if self.queries not in QUERY_MODES:
            raise ValueError(f"memory queries must be one of {QUERY_MODES}; got {self.queries!r}")
        if self.states.dim() != 3:
            raise ValueError(f"memory states must be [batch, tokens, width]; got {tuple(self.states.shape)}")
        if self.mask is not None and self.mask.shape != self.states.shape[:2]:
            raise ValueError(f"memory mask {tuple(self.mask.shape)} must be [batch, tokens] = "
                             f"{tuple(self.states.shape[:2])}")


class CrossAttention(torch.nn.Module):
    """x [B, S, H] -> its cross-attention update [B, S, H] (the caller adds it to x) over a ``Memory``."""

    def __init__(self, hidden_size: int, memory_size: int, heads: int, kv_heads: int, head_dim: int,
                 norm: torch.nn.Module, *, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"cross-attention: {heads} query heads must be a multiple of {kv_heads} key/value heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm = norm
        self.q_proj = torch.nn.Linear(hidden_size, heads * head_dim, bias=qkv_bias)
        self.k_proj = torch.nn.Linear(memory_size, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = torch.nn.Linear(memory_size, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden_size, bias=o_bias)

    def forward(self, hidden: Tensor, memory: Memory) -> Tensor:
        b, s, _ = hidden.shape
        m = memory.states.shape[1]
        x = self.norm(hidden)
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        states = memory.states.to(q.dtype)
        k = self.k_proj(states).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        out = memory_attention(q, k, v, memory.mask, group=memory.group, queries=memory.queries,
                               kernel=memory.kernel, scale=1 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


def cross_attention_like(self_attn: torch.nn.Module, post_norm: torch.nn.Module, memory_size: int) -> CrossAttention:
    """A CrossAttention with the heads, widths and biases of a decoder layer's ``self_attn`` (HF Llama-style:
    q/k/v/o_proj), its norm a copy of ``post_norm``'s module, reading ``memory_size``-wide encoder states."""
    q, k, o = self_attn.q_proj, self_attn.k_proj, self_attn.o_proj
    head_dim = self_attn.head_dim
    return CrossAttention(q.in_features, memory_size, q.out_features // head_dim, k.out_features // head_dim,
                          head_dim, copy.deepcopy(post_norm), qkv_bias=q.bias is not None,
                          o_bias=o.bias is not None).to(q.weight.dtype)


@torch.no_grad()
def init_cross_attention(cross: CrossAttention, self_attn: torch.nn.Module, post_norm: torch.nn.Module, mode: str,
                         std: float = 0.02) -> None:
    """Set ``cross``'s weights: "copy" the layer's self-attention q/k/v/o (k and v sliced [:out, :memory width])
    and its post-attention norm; "normal" N(0, std) weights, zero biases and a unit norm; "zero" as normal with a
    zero output projection (the block then adds nothing until it trains)."""
    if mode == "copy":
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mine, theirs = getattr(cross, name), getattr(self_attn, name)
            out_f, in_f = mine.weight.shape
            mine.weight.copy_(theirs.weight[:out_f, :in_f])
            if mine.bias is not None:
                mine.bias.copy_(theirs.bias[:out_f])
        cross.norm.load_state_dict(post_norm.state_dict())
        return
    if mode not in ("normal", "zero"):
        raise ValueError(f"unknown cross-attention init {mode!r}: use copy, normal or zero")
    for proj in (cross.q_proj, cross.k_proj, cross.v_proj, cross.o_proj):
        proj.weight.normal_(0.0, std)
        if proj.bias is not None:
            proj.bias.zero_()
    for p in cross.norm.parameters():
        p.fill_(1.0)
    if mode == "zero":
        cross.o_proj.weight.zero_()
