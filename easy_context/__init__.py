"""easy_context: exact sequence-parallel attention for long-context training on PyTorch's own kernels.

Self-contained: copy this folder into another codebase; it imports only torch (transformers and
flash-attn are optional and imported where used).
"""

from .backends import BACKENDS, Backend, get_backend
from .kernels import AttentionKernel, available_kernels, get_kernel, select_kernel
from .layouts import gather, local_ranges, position_ids, shard, unshard
from .merge import merge_
from .ring import ring_attention
from .zigzag import zigzag_ring_attention

__all__ = [
    "BACKENDS", "Backend", "get_backend",
    "AttentionKernel", "available_kernels", "get_kernel", "select_kernel",
    "gather", "local_ranges", "position_ids", "shard", "unshard",
    "merge_", "ring_attention", "zigzag_ring_attention",
]
