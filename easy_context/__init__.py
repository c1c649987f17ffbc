"""easy_context: exact sequence-parallel attention for long-context training on PyTorch's own kernels.

Self-contained: copy this folder into another codebase; it imports only torch (transformers and
flash-attn are optional and imported where used).
"""

from .backends import BACKENDS, Backend, backend_layout, get_backend
from .dist_flash import dist_flash_attention
from .kernels import AttentionKernel, available_kernels, get_kernel, select_kernel
from .layouts import gather, local_ranges, position_ids, shard, unshard
from .merge import merge_
from .ring import ring_attention
from .ulysses import ulysses_attention
from .usp import USPGroup, new_usp_group, usp_attention
from .zigzag import zigzag_ring_attention

__all__ = [
    "BACKENDS", "Backend", "backend_layout", "get_backend",
    "AttentionKernel", "available_kernels", "get_kernel", "select_kernel",
    "gather", "local_ranges", "position_ids", "shard", "unshard",
    "merge_", "ring_attention", "zigzag_ring_attention",
    "ulysses_attention", "usp_attention", "new_usp_group", "USPGroup", "dist_flash_attention",
]
