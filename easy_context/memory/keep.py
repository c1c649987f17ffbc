"""Keep each layer's attention output through the activation-checkpoint recompute instead of rerunning it.

With gradient checkpointing every layer's forward runs twice: once in the forward pass, once more in the
backward pass to rebuild what the backward needs. At long lengths attention dominates that recompute
(and with a ring it repeats every send and receive). ``keep_attention_outputs(model)`` stores each attention
call's (out, lse) on its first forward and hands the same tensors back when the recompute reaches it, so
the recompute rebuilds only q, k and v (cheap projections) and the backward then runs as usual from the
kept out and lse. Exact: the recompute of a checkpointed layer is deterministic, so its q, k, v equal
the first forward's. The cost is one attention output (and float32 lse) per layer kept alive from
forward to backward: ``[B, S_local, H * D]`` in the model dtype, 0.5 GiB per layer per GPU for a 7B model
at 64K local tokens.

The mechanism (``reuse_or_compute`` in the backends, ``attention_call_scope`` around each attention module's call) lives in
``attention.reuse``; this module attaches the store to a model.
"""

from __future__ import annotations

import torch

from ..attention.reuse import ATTR, KeptOutputs


def keep_attention_outputs(model: torch.nn.Module) -> KeptOutputs:
    """Make ``model``'s easy_context attention keep its outputs through the checkpoint recompute; returns the
    store. Each forward of ``model`` or of its decoder body (``base_model``, what the chunked loss calls)
    starts with an empty store, so a forward that was never backpropagated (evaluation with grad on, an
    exception) leaves nothing stale behind; the recompute reruns single layers and never clears it."""
    store = KeptOutputs()
    for m in model.modules():
        setattr(m, ATTR, store)
    for entry in {id(model): model, id(model.base_model): model.base_model}.values():
        entry.register_forward_pre_hook(lambda *_: store.clear())
    return store
