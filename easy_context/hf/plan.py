"""Put a job's parallel plan into a Hugging Face model: the plan's attention backend, registered and set."""

from __future__ import annotations

from ..parallel.plan import ParallelPlan
from .attention import apply_seq_parallel_monkey_patch
from .s2attn import apply_s2attn


def apply_plan(model, plan: ParallelPlan, *, position_jumps: bool = False):
    """Make ``model`` run ``plan``'s attention; returns it. A data-parallel plan keeps the model's own attention,
    except with ``position_jumps`` (PoSE): sdpa would read jumping positions as packed documents, so the
    exact ring backend then runs on the one-rank group."""
    name = plan.backend.name
    if name == "s2attn":
        return apply_s2attn(model, group=plan.groups.sp_group, kernel=plan.kernel)
    if not plan.backend.sequence_parallel:
        if not position_jumps:
            return model
        return apply_seq_parallel_monkey_patch("ring", model, group=plan.groups.sp_group, kernel=plan.kernel)
    return apply_seq_parallel_monkey_patch(plan.backend, model, group=plan.attention_group, kernel=plan.kernel)
