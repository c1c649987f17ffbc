"""Registry of attention backends by name: the attention function, its input layout, what kind of backend it is.

``BACKENDS`` holds the exact sequence-parallel backends; ``REGISTRY`` adds the two that are not: "data_parallel"
(each rank runs whole sequences with the model's own attention) and "s2attn" (LongLoRA's shifted sparse
attention, an approximation for training only). ``get_backend`` also takes EasyContext's method names.

Every backend's attention has the signature
``fn(q, k, v, *, causal=True, scale=None, group=None, kernel=None, return_lse=False, check=True, documents=None)``
with q [B, H, S_local, D], k/v [B, H_kv, S_local, D], each rank holding its ``layout`` shard of the
sequence (``layouts.shard``), and returns out [B, H, S_local, D] (plus the float32 lse when asked);
``documents`` (``documents.Documents`` of the whole sequence) keeps each token inside its packed document.
"usp" takes ``group=new_usp_group(...)`` and its layout depends on the degrees: use ``backend_layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .dist_flash import dist_flash_attention
from .layouts import usp_layout
from .ring import ring_attention
from .s2attn import LAYOUT as S2_LAYOUT
from .s2attn import s2_attention
from .ulysses import ulysses_attention
from .usp import usp_attention
from .zigzag import zigzag_ring_attention


@dataclass(frozen=True)
class Backend:
    """A named backend: its attention function (None: the model's own), the layout its inputs are sharded in,
    whether it splits a sequence over ranks, whether it is exact (S²-Attn is not: training only), and whether it
    splits the q heads over its (Ulysses) all-to-all group, which must then divide the head count."""

    name: str
    attention: Callable | None
    layout: str
    sequence_parallel: bool = True
    exact: bool = True
    splits_heads: bool = False


BACKENDS: dict[str, Backend] = {
    "ring": Backend("ring", ring_attention, "contiguous"),
    "zigzag_ring": Backend("zigzag_ring", zigzag_ring_attention, "zigzag"),
    "ulysses": Backend("ulysses", ulysses_attention, "contiguous", splits_heads=True),
    "usp": Backend("usp", usp_attention, "usp", splits_heads=True),  # layout "usp{U}x{R}": see backend_layout
    "dist_flash": Backend("dist_flash", dist_flash_attention, "contiguous"),
}
REGISTRY: dict[str, Backend] = {
    **BACKENDS,
    "data_parallel": Backend("data_parallel", None, "contiguous", sequence_parallel=False),
    "s2attn": Backend("s2attn", s2_attention, S2_LAYOUT, exact=False),
}
# EasyContext's method names.
ALIASES = {"zigzag_ring_attn": "zigzag_ring", "ulysses_attn": "ulysses", "usp_attn": "usp",
           "dist_flash_attn": "dist_flash"}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (or its EasyContext alias); ValueError listing the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def backend_layout(name: str, *, ulysses_degree: int = 1, ring_degree: int = 1) -> str:
    """The concrete input layout of backend ``name``: ``usp{U}x{R}`` for "usp", else ``Backend.layout``."""
    backend = get_backend(name)
    return usp_layout(ulysses_degree=ulysses_degree, ring_degree=ring_degree) if name == "usp" else backend.layout
