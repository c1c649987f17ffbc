"""Put a job's parallel plan into a Hugging Face model: the plan's attention backend, registered and set."""

from __future__ import annotations

from ..parallel.plan import ParallelPlan
from .attention import use_sequence_parallel_attention
from .s2attn import apply_s2attn


def apply_plan(model, plan: ParallelPlan, *, position_jumps: bool = False, packed_documents: bool = False):
    """Make ``model`` run ``plan``'s attention; returns it. A data-parallel plan keeps the model's own attention,
    except with ``position_jumps`` (PoSE: sdpa would read jumping positions as packed documents) or
    ``packed_documents`` (sdpa honours restarting positions only through an [S, S] mask, quadratic memory): the
    exact ring backend then runs on the one-rank group, within documents by varlen kernel calls."""
    backend = plan.backend
    if not backend.exact:  # S²-Attn: sparse shifted groups in training, exact attention in eval mode
        return apply_s2attn(model, group=plan.groups.sp_group, kernel=plan.kernel)
    if backend.sequence_parallel:
        return use_sequence_parallel_attention(backend, model, group=plan.attention_group, kernel=plan.kernel)
    if not (position_jumps or packed_documents):
        return model
    return use_sequence_parallel_attention("ring", model, group=plan.groups.sp_group, kernel=plan.kernel)
