"""Exact token-mean cross entropy over a sequence-parallel group, from hidden states, in sequence chunks.

``chunked_cross_entropy`` computes logits = hidden @ weight.T (+ bias) ``chunk_size`` rows at a time, so at
most one float32 chunk of logits and its bf16 copy exist at once, never the whole [S, V] (at 512K tokens and a 128K
vocabulary that would be 256 GB in float32; one default chunk of 1024 rows is 0.5 GB). A summed or mean loss
with gradients on (training) takes each chunk's gradients in the same pass as its loss, so its logits are
computed once; backward only scales them by the upstream gradient (one backward per forward). Per-token losses
(``reduction="none"``) recompute each chunk in backward, where the upstream gradient of each token is known.
The weight gradient is accumulated in float32 (V x H floats). ``fused=True`` computes each chunk's softmax, losses
and logit gradient in kernels torch.compile fuses, instead of the six memory-bound passes over the float32 logits
that eager PyTorch makes; the same formulas, only the order of float32 operations inside a kernel may differ.

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
from ..attention.compiled import compiled
from ..attention.precision import accumulation_dtype, add_product_, autocast_dtype, wide_product

Tensor = torch.Tensor
DEFAULT_CHUNK = 1024
REDUCTIONS = ("sum", "mean", "none")


def _raw_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """float32 (float64 for float64 inputs) logits h @ weight.T (+ bias) of one chunk, before any soft cap."""
    wide = accumulation_dtype(weight.dtype)
    return wide_product(h, weight.t(), wide) if bias is None else torch.addmm(bias, h, weight.t()).to(wide)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """float32 (float64 for float64 inputs) logits of one chunk, and tanh(raw / softcap) when soft-capped."""
    z = _raw_logits(h, weight, bias)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _autocast_state(device: str) -> tuple[str, bool, torch.dtype]:
    """(device type, autocast on?, its dtype) in force now on ``device``."""
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _matmul_weight(weight: Tensor) -> Tensor:
    """The weight in the dtype the head's matmuls take here (autocast's where it is on), cast once per pass: autocast
    would cast it again for every chunk's matmul."""
    dtype = autocast_dtype(weight.device.type)
    return weight if dtype is None else weight.to(dtype)


def _fused_softmax_terms(z: Tensor, y: Tensor, keep: Tensor, softcap: float | None, grad: bool,
                         row_scale: Tensor | None, bias_grad: bool,
                         grad_dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``_losses_and_logit_grad``'s result from the raw float32 logits ``z`` [n, V] and in-range labels ``y``: the
    same formulas written out of place, for torch.compile to fuse (in place, z would be written back)."""
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    top = z.amax(dim=1, keepdim=True)
    e = torch.exp(z - top)
    total = e.sum(dim=1, keepdim=True)
    losses = torch.where(keep, (total.log() + top - z.gather(1, y.unsqueeze(1))).squeeze(1), 0.0)
    if not grad:
        return losses, None, None
    label = torch.arange(z.shape[1], device=z.device) == y.unsqueeze(1)
    scale = torch.where(keep, total.squeeze(1).reciprocal(), 0.0)
    scale = (scale if row_scale is None else scale * row_scale).unsqueeze(1)
    g = torch.where(label, e - total, e) * scale
    if t is not None:
        g = g * (1 - t * t)
    return losses, g.to(grad_dtype), g.sum(0) if bias_grad else None


def _losses_and_logit_grad(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, keep: Tensor,
                           softcap: float | None, grad: bool, row_scale: Tensor | None = None,
                           bias_grad: bool = False, fused: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One chunk's per-token losses [n] (0 on ignored rows) and, with ``grad``, d (sum_i row_scale_i loss_i) / d raw
    logits [n, V] in the matmul dtype (row_scale None: all 1; zero on ignored rows) and, with ``bias_grad``, its
    float32 column sums. Its float32 logits live in this function only, so they are freed before the caller's
    [V, H] weight-gradient product. ``fused``: the softmax part compiled (``_fused_softmax_terms``)."""
    if fused:
        return compiled(_fused_softmax_terms)(_raw_logits(h, weight, bias), torch.where(keep, y, 0), keep, softcap,
                                              grad, row_scale, bias_grad, weight.dtype)
    z, t = _logits(h, weight, bias, softcap)
    picked = z.gather(1, torch.where(keep, y, 0).unsqueeze(1)).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    e = z.sub_(top).exp_()  # in place: the logits are not read again
    total = e.sum(dim=1)
    losses = torch.where(keep, total.log() + top.squeeze(1) - picked, 0.0)  # logsumexp - the label's logit
    if not grad:
        return losses, None, None
    # softmax - onehot(label) = (e - total * onehot) / total: the label's -1 is taken in float32, before the division
    g = e.scatter_add_(1, torch.where(keep, y, 0).unsqueeze(1), -torch.where(keep, total, 0.0).unsqueeze(1))
    scale = torch.where(keep, total.reciprocal(), 0.0)  # 0 on ignored rows
    scale = (scale if row_scale is None else scale * row_scale).unsqueeze(1)
    if t is None and not bias_grad and g.dtype != weight.dtype:  # scaled and cast to the matmul dtype in one pass
        return losses, torch.mul(g, scale, out=torch.empty_like(g, dtype=weight.dtype)), None
    g.mul_(scale)
    if t is not None:
        g.mul_(1 - t * t)  # through cap * tanh(raw / cap)
    return losses, g.to(weight.dtype), g.sum(0) if bias_grad else None


class _Grads:
    """Float32 (float64) gradient accumulators of the head's inputs, filled one chunk at a time."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        acc = accumulation_dtype(weight.dtype)  # a bf16 running sum over many chunks would lose low-order bits
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        self.dh = torch.empty_like(hidden) if needs[0] else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None

    @property
    def wanted(self) -> bool:
        """Whether any gradient is asked for."""
        return self.dh is not None or self.dw is not None or self.db is not None

    def add(self, a: int, h: Tensor, weight: Tensor, g: Tensor, g_sum: Tensor | None) -> None:
        """Rows a.. of the hidden gradient and a chunk's share of the weight and bias gradients, from its rows ``h``
        and logit gradient ``g`` and its column sums (``h``, ``weight`` and ``g`` in the matmul dtype)."""
        if self.dh is not None:
            self.dh[a:a + g.shape[0]] = g @ weight
        if self.dw is not None:
            add_product_(self.dw, g.t(), h)
        if self.db is not None:
            self.db += g_sum

    def result(self, scale: Tensor | None = None) -> tuple:
        """(d hidden, d weight, d bias) in the inputs' dtypes (None where not needed), first multiplied in place
        by ``scale`` (before the cast: an unscaled sum over many tokens could overflow float16)."""
        if scale is not None:
            for g in (self.dh, self.dw, self.db):
                if g is not None:
                    g.mul_(scale)
        w_dtype, b_dtype = self.dtypes
        return (self.dh, None if self.dw is None else self.dw.to(w_dtype),
                None if self.db is None else self.db.to(b_dtype))


def _chunk_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, a: int, size: int,
                ignore_index: int, softcap: float | None, fused: bool, grads: _Grads | None,
                row_scale: Tensor | None = None) -> Tensor:
    """Rows a..a+size: their per-token losses; their gradients (weighted by ``row_scale``) added into ``grads``
    unless it is None. ``weight`` as ``_matmul_weight`` gives it; ``fused`` as in ``_losses_and_logit_grad``."""
    h, y = hidden[a:a + size], labels[a:a + size]
    if h.dtype != weight.dtype and torch.is_autocast_enabled(h.device.type):
        h = h.to(weight.dtype)  # autocast's cast, once for the chunk's three matmuls
    want = grads is not None and grads.wanted
    losses, g, g_sum = _losses_and_logit_grad(h, weight, bias, y, y != ignore_index, softcap, want, row_scale,
                                              bias_grad=want and grads.db is not None, fused=fused)
    if want:
        grads.add(a, h, weight, g, g_sum)
    return losses


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] of softmax(h W^T + b) against labels, logits recomputed chunkwise in backward (the
    upstream gradient of each token is known only then)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, softcap, fused):
        losses = torch.zeros(hidden.shape[0], dtype=accumulation_dtype(weight.dtype), device=hidden.device)
        w = _matmul_weight(weight)
        for a in range(0, hidden.shape[0], chunk_size):
            losses[a:a + chunk_size] = _chunk_pass(hidden, w, bias, labels, a, chunk_size, ignore_index, softcap,
                                                   fused, None)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (chunk_size, ignore_index, softcap, fused)
        ctx.autocast = _autocast_state(hidden.device.type)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        # Autograd runs backward outside the caller's autocast: recompute under the forward's, so that the
        # matmuls take the same bf16 inputs as the forward's (float32 master weights would make them float32).
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            hidden, weight, bias, labels = ctx.saved_tensors
            chunk_size, ignore_index, softcap, fused = ctx.args
            grads, w = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3]), _matmul_weight(weight)
            for a in range(0, hidden.shape[0], chunk_size):
                _chunk_pass(hidden, w, bias, labels, a, chunk_size, ignore_index, softcap, fused, grads,
                            row_scale=grad_losses[a:a + chunk_size])
            return *grads.result(), None, None, None, None, None


def _summed_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int,
                 ignore_index: int, softcap: float | None, fused: bool,
                 needs: tuple[bool, bool, bool]) -> tuple[Tensor, _Grads]:
    """The summed loss over all rows and, where ``needs`` asks, its unscaled gradients: each chunk's logits once."""
    total = torch.zeros((), dtype=accumulation_dtype(weight.dtype), device=hidden.device)
    grads, w = _Grads(hidden, weight, bias, needs), _matmul_weight(weight)
    for a in range(0, hidden.shape[0], chunk_size):
        total += _chunk_pass(hidden, w, bias, labels, a, chunk_size, ignore_index, softcap, fused, grads).sum()
    return total, grads


class _FusedLinearCrossEntropySum(torch.autograd.Function):
    """The summed loss of softmax(h W^T + b) against labels, its gradients computed chunk by chunk in forward
    (each chunk's logits once) and handed over in backward, scaled in place by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, softcap, fused):
        total, ctx.grads = _summed_loss(hidden, weight, bias, labels, chunk_size, ignore_index, softcap, fused,
                                        needs=ctx.needs_input_grad[:3])
        return total  # ctx.grads is kept off save_for_backward: backward scales it in place

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy: the gradients of a summed or mean loss are computed in forward "
                               "and handed over by the first backward; run the loss again instead of backward twice")
        grads, ctx.grads = ctx.grads, None
        return *grads.result(grad_total), None, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          chunk_size: int = DEFAULT_CHUNK, ignore_index: int = -100,
                          softcap: float | None = None, reduction: str = "sum", fused: bool = False) -> Tensor:
    """Cross entropy of logits ``hidden @ weight.T (+ bias)`` against ``labels``, chunk by chunk, in float32.

    hidden [..., H] with labels [...] (e.g. [B, S, H] and [B, S]); weight [V, H]; ``ignore_index`` targets
    count zero. ``softcap`` c applies c * tanh(logits / c) first. ``reduction``: "sum", "mean" over the
    non-ignored targets (0 when there are none), or "none" (per-token losses shaped like ``labels``).
    Float64 inputs are computed in float64. ``fused``: each chunk's softmax part in torch.compile'd kernels.
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
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat, chunk_size, ignore_index, softcap, fused)
    if reduction == "none":
        return _ChunkedLinearCrossEntropy.apply(*args).view(labels.shape)
    if torch.is_grad_enabled():
        total = _FusedLinearCrossEntropySum.apply(*args)
    else:
        total, _ = _summed_loss(*args, needs=(False, False, False))
    return total / (flat != ignore_index).sum().clamp_min(1) if reduction == "mean" else total


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
                                    ignore_index: int = -100, softcap: float | None = None,
                                    fused: bool = False) -> SPLoss:
    """Collective over ``group``: this rank's part of the group's exact token-mean CE (module doc).

    hidden [B, S_local, H] and labels [B, S_local] are this rank's shard (targets already shifted, as
    ``inputs.prepare_seq_parallel_inputs`` makes them). ``grad_reduction``: "mean" if your trainer
    averages gradients over the ranks (loss = share x P), "sum" if you sum them over the SP group. ``fused``:
    as in ``chunked_cross_entropy``.
    """
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' (trainer averages gradients) or 'sum'; got {grad_reduction!r}")
    local_sum = chunked_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size,
                                      ignore_index=ignore_index, softcap=softcap, reduction="sum", fused=fused)
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
