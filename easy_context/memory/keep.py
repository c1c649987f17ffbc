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

The mechanism (``reuse_or_compute`` in the backends, ``attention_call_scope`` around each attention module's
call) lives in ``attention.reuse``; this module attaches the store to a model.
"""

from __future__ import annotations

import torch

from ..attention.reuse import ATTR, KeptOutputs

# By default (train.py) outputs are kept only while they take at most this share of the GPU's memory: measured
# 1.07x (16K) and 1.14x (32K) faster on the Llama-3.2-1B shape than without, for 4% and 8% more peak memory
# (one H200, bench_peers.py --extra=--no-keep-attention against the defaults).
DEFAULT_SHARE = 1 / 16


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


def kept_attention_bytes(config, *, tokens: int, dtype: torch.dtype, layers: int) -> int:
    """Bytes ``keep_attention_outputs`` holds at the end of a forward: for each of ``layers`` checkpointed layers,
    the attention output of ``tokens`` local tokens (batch x local length) in ``dtype`` and its float32 lse."""
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * tokens * heads * (dim * dtype.itemsize + 4)


def keep_by_default(kept: int, device_bytes: int | None) -> bool:
    """Whether to keep attention outputs when no flag says: on a GPU of ``device_bytes``, while the ``kept`` bytes
    are at most ``DEFAULT_SHARE`` of it (the speed is worth that much memory; at the longest lengths it is not)."""
    return device_bytes is not None and 0 < kept <= device_bytes * DEFAULT_SHARE
