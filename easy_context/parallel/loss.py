"""Exact token-mean cross entropy over a sequence-parallel group, from hidden states, in sequence chunks.

``chunked_cross_entropy`` computes logits = hidden @ weight.T (+ bias) ``chunk_size`` rows at a time and
recomputes each chunk in backward, so at most ~3 x chunk_size x V floats of logits exist at once, never
the whole [S, V] (at 512K tokens and a 128K vocabulary that would be 256 GB in float32; one default
chunk of 1024 rows is 0.5 GB). The weight gradient is accumulated in float32 (V x H floats).

Gradient convention of ``sequence_parallel_cross_entropy`` (read before wiring it into a trainer):
each rank returns ``local_sum / N`` where N is the number of non-ignored targets in the whole SP group
(counted with an all-reduce, no gradient). These shares add up to the exact token mean over the group's
sequence, so the exact gradient is the SUM over the SP group of every rank's parameter gradients (the
attention backward already sends each K/V gradient back to the rank that owns it). Trainers average
gradients instead (DDP, DeepSpeed, FSDP over a data-parallel group that contains whole SP groups): for
them, ``grad_reduction="mean"`` (the default) multiplies the share by the SP group size P, which cancels
the 1/P. With several DP replicas the result is then the mean over replicas of each replica's exact
token mean. ``grad_reduction="sum"`` returns the bare share, for loops that all-reduce-SUM themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention.comm import rank_and_size
from ..attention.precision import accumulation_dtype

Tensor = torch.Tensor
DEFAULT_CHUNK = 1024
REDUCTIONS = ("sum", "mean", "none")


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """float32 (float64 for float64 inputs) logits of one chunk, and tanh(raw / softcap) when soft-capped."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.to(accumulation_dtype(weight.dtype))
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _autocast_state(device: str) -> tuple[str, bool, torch.dtype]:
    """(device type, autocast on?, its dtype) in force now on ``device``."""
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] of softmax(h W^T + b) against labels, logits recomputed chunkwise in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, softcap):
        losses = torch.zeros(hidden.shape[0], dtype=accumulation_dtype(weight.dtype), device=hidden.device)
        for a in range(0, hidden.shape[0], chunk_size):
            z, _ = _logits(hidden[a:a + chunk_size], weight, bias, softcap)
            y = labels[a:a + chunk_size]
            keep = y != ignore_index
            picked = z.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
            losses[a:a + chunk_size] = torch.where(keep, torch.logsumexp(z, dim=1) - picked, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (chunk_size, ignore_index, softcap)
        ctx.autocast = _autocast_state(hidden.device.type)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        # Autograd runs backward outside the caller's autocast: recompute under the forward's, so that the
        # matmuls take the same bf16 inputs as the forward's (float32 master weights would make them float32).
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _ChunkedLinearCrossEntropy._backward(ctx, grad_losses)

    @staticmethod
    def _backward(ctx, grad_losses):
        hidden, weight, bias, labels = ctx.saved_tensors
        chunk_size, ignore_index, softcap = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        # float32 accumulators: a bf16 running sum over many chunks would lose low-order bits.
        acc = accumulation_dtype(weight.dtype)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for a in range(0, hidden.shape[0], chunk_size):
            h = hidden[a:a + chunk_size]
            y = labels[a:a + chunk_size]
            keep = y != ignore_index
            z, t = _logits(h, weight, bias, softcap)
            g = torch.softmax(z, dim=1)  # d loss / d logits = softmax - onehot(label), per kept row
            del z
            g.scatter_add_(1, torch.where(keep, y, 0).unsqueeze(1), -keep.to(g.dtype).unsqueeze(1))
            g.mul_(torch.where(keep, grad_losses[a:a + chunk_size], 0.0).unsqueeze(1))
            if t is not None:
                g.mul_(1 - t * t)  # through cap * tanh(raw / cap)
            if need_h:
                dh[a:a + chunk_size] = g.to(weight.dtype) @ weight
            if need_w:
                dw += (g.t().to(h.dtype) @ h).to(acc)
            if need_b:
                db += g.sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          chunk_size: int = DEFAULT_CHUNK, ignore_index: int = -100,
                          softcap: float | None = None, reduction: str = "sum") -> Tensor:
    """Cross entropy of logits ``hidden @ weight.T (+ bias)`` against ``labels``, chunk by chunk, in float32.

    hidden [..., H] with labels [...] (e.g. [B, S, H] and [B, S]); weight [V, H]; ``ignore_index`` targets
    count zero. ``softcap`` c applies c * tanh(logits / c) first. ``reduction``: "sum", "mean" over the
    non-ignored targets (0 when there are none), or "none" (per-token losses shaped like ``labels``).
    Float64 inputs are computed in float64.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids; got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {ignore_index}; got "
                         f"{flat[bad][0].item()}")
    losses = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat,
                                              chunk_size, ignore_index, softcap)
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "mean":
        return losses.sum() / (flat != ignore_index).sum().clamp_min(1)
    return losses.sum()


@dataclass(frozen=True)
class SPLoss:
    """``loss``: call backward on it (scaled per ``grad_reduction``); ``value``: the exact token-mean
    cross entropy of the whole SP group (detached, equal on every rank; log this); ``num_tokens``:
    non-ignored targets in the group."""

    loss: Tensor
    value: Tensor
    num_tokens: int


def sequence_parallel_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                                    group: dist.ProcessGroup | None = None, grad_reduction: str = "mean",
                                    bias: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                                    ignore_index: int = -100, softcap: float | None = None) -> SPLoss:
    """Collective over ``group``: this rank's part of the group's exact token-mean CE (module doc).

    hidden [B, S_local, H] and labels [B, S_local] are this rank's shard (targets already shifted, as
    ``inputs.prepare_seq_parallel_inputs`` makes them). ``grad_reduction``: "mean" if your trainer
    averages gradients over the ranks (loss = share x P), "sum" if you sum them over the SP group.
    """
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' (trainer averages gradients) or 'sum'; got {grad_reduction!r}")
    local_sum = chunked_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size,
                                      ignore_index=ignore_index, softcap=softcap, reduction="sum")
    count = (labels != ignore_index).sum()  # int64: exact at any token count
    return token_mean(local_sum, count, group, grad_reduction)


def token_mean(local_sum: Tensor, count: Tensor, group, grad_reduction: str = "mean") -> SPLoss:
    """The token mean over ``group`` (None: the default group) of a quantity summed over this rank's ``count``
    tokens (``count`` is all-reduced in place): this rank's share (x P for "mean" gradient reduction), the exact
    group value and the group's token count."""
    _, world = rank_and_size(group)
    if world > 1:
        dist.all_reduce(count, group=group)
    share = local_sum / count.clamp_min(1)
    value = share.detach().clone()
    if world > 1:
        dist.all_reduce(value, group=group)
    return SPLoss(share * world if grad_reduction == "mean" else share, value, int(count.item()))
