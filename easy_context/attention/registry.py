"""Registry of sequence-parallel attention backends by name: the attention function and its input layout.

Every backend's attention has the signature
``fn(q, k, v, *, causal=True, scale=None, group=None, kernel=None, return_lse=False, check=True)``
with q [B, H, S_local, D], k/v [B, H_kv, S_local, D], each rank holding its ``layout`` shard of the
sequence (``layouts.shard``), and returns out [B, H, S_local, D] (plus the float32 lse when asked).
"usp" takes ``group=new_usp_group(...)`` and its layout depends on the degrees: use ``backend_layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .dist_flash import dist_flash_attention
from .layouts import usp_layout
from .ring import ring_attention
from .ulysses import ulysses_attention
from .usp import usp_attention
from .zigzag import zigzag_ring_attention


@dataclass(frozen=True)
class Backend:
    """A named backend: its attention function and the layout its inputs must be sharded in."""

    name: str
    attention: Callable
    layout: str


BACKENDS: dict[str, Backend] = {
    "ring": Backend("ring", ring_attention, "contiguous"),
    "zigzag_ring": Backend("zigzag_ring", zigzag_ring_attention, "zigzag"),
    "ulysses": Backend("ulysses", ulysses_attention, "contiguous"),
    "usp": Backend("usp", usp_attention, "usp"),  # placeholder: "usp{U}x{R}", see backend_layout
    "dist_flash": Backend("dist_flash", dist_flash_attention, "contiguous"),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown sequence-parallel backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def backend_layout(name: str, *, ulysses_degree: int = 1, ring_degree: int = 1) -> str:
    """The concrete input layout of backend ``name``: ``usp{U}x{R}`` for "usp", else ``Backend.layout``."""
    backend = get_backend(name)
    return usp_layout(ulysses_degree=ulysses_degree, ring_degree=ring_degree) if name == "usp" else backend.layout
