"""CEPED distillation: the original model (the teacher) reads context + window as one sequence and its top-k next-
token probabilities at the window's positions are kept (k = 50 by default); the student, reading the context
through its encoder, adds kl_coef x KL(teacher || student) over those k tokens plus a "rest" bucket holding the
probability mass outside them (``rest="bucket"``), or over the k tokens alone (``rest="drop"``, as the paper's
``kl_loss_mode drop``: both sides' top-k probabilities, not renormalized).

The student's logits are built ``chunk_size`` rows at a time and rebuilt in backward, like the chunked cross
entropy (``parallel.loss``): no [S, vocab] tensor is ever kept.
"""

from __future__ import annotations

import torch

from ..attention.precision import accumulation_dtype

Tensor = torch.Tensor
RESTS = ("bucket", "drop")
DEFAULT_TOPK = 50


@torch.no_grad()
def teacher_topk(hidden: Tensor, weight: Tensor, k: int = DEFAULT_TOPK, *,
                 chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(probs, ids) [..., k]: the ``k`` largest next-token probabilities (float32, descending) and their token ids
    under logits ``hidden @ weight.T`` (hidden [..., H], weight [V, H]), ``chunk_size`` rows at a time."""
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"top-k must be in [1, vocab size {weight.shape[0]}]; got {k}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    probs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    for a in range(0, flat.shape[0], chunk_size):
        z = (flat[a:a + chunk_size] @ weight.t()).float()
        p, i = torch.topk(torch.softmax(z, dim=-1), k, dim=-1)
        probs[a:a + chunk_size], ids[a:a + chunk_size] = p, i
    return probs.view(*hidden.shape[:-1], k), ids.view(*hidden.shape[:-1], k)


@torch.no_grad()
def window_topk(teacher, ids: Tensor, window: int, k: int = DEFAULT_TOPK, *,
                chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The teacher pass: a HF causal LM ``teacher`` (its own attention, whole sequences) reads ids [B, T] (context
    then window) and returns its top-k (probs, ids) [B, window, k] at the last ``window`` positions."""
    hidden = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -window:]
    return teacher_topk(hidden, teacher.get_output_embeddings().weight, k, chunk_size=chunk_size)


def _rows(z: Tensor, p: Tensor, ids: Tensor, rest: str) -> tuple[Tensor, ...]:
    """For logits z [n, V]: (kl [n], softmax s, p_rest, log q_rest) of teacher probs p [n, k] at ``ids``."""
    lse = torch.logsumexp(z, dim=-1)
    log_q = z.gather(1, ids) - lse[:, None]
    kl = (torch.xlogy(p, p) - p * log_q).sum(1)
    if rest == "drop":
        return kl, torch.exp(z - lse[:, None]), None, None
    p_rest = (1 - p.sum(1)).clamp_min(0)
    log_rest_mass = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=-1)  # exact, no 1 - sum cancellation
    log_q_rest = log_rest_mass - lse
    kl = kl + torch.xlogy(p_rest, p_rest) - torch.where(p_rest > 0, p_rest * log_q_rest, 0.0)  # 0 log 0 = 0
    return kl, torch.exp(z - lse[:, None]), p_rest, log_rest_mass


class _ChunkedTopKL(torch.autograd.Function):
    """Per-row KL [N] of teacher top-k probs against softmax(h W^T), logits recomputed chunkwise in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, probs, ids, rest, chunk_size):
        acc = accumulation_dtype(weight.dtype)
        kl = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk_size):
            z = (hidden[a:a + chunk_size] @ weight.t()).to(acc)
            kl[a:a + chunk_size] = _rows(z, probs[a:a + chunk_size].to(acc), ids[a:a + chunk_size], rest)[0]
        ctx.save_for_backward(hidden, weight, probs, ids)
        ctx.args = (rest, chunk_size)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, probs, ids = ctx.saved_tensors
        rest, chunk_size = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = accumulation_dtype(weight.dtype)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for a in range(0, hidden.shape[0], chunk_size):
            h = hidden[a:a + chunk_size]
            p, i = probs[a:a + chunk_size].to(acc), ids[a:a + chunk_size]
            z = (h @ weight.t()).to(acc)
            _, s, p_rest, log_rest_mass = _rows(z, p, i, rest)
            # d KL / d z_j = (sum p + p_rest) s_j - p_j [j in top-k] - p_rest [j not in top-k] e^{z_j} / rest mass
            mass = p.sum(1) if p_rest is None else p.sum(1) + p_rest
            g = s * mass[:, None]
            if p_rest is not None:
                g -= p_rest[:, None] * torch.exp(z - log_rest_mass[:, None]).scatter(1, i, 0.0)
            g.scatter_add_(1, i, -p)
            g *= grad_kl[a:a + chunk_size, None]
            if need_h:
                dh[a:a + chunk_size] = g.to(weight.dtype) @ weight
            if need_w:
                dw += (g.t().to(h.dtype) @ h).to(acc)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def topk_kl(hidden: Tensor, weight: Tensor, probs: Tensor, ids: Tensor, *, rest: str = "bucket",
            chunk_size: int = 1024) -> Tensor:
    """Per-position KL(teacher || student) [...] (module doc): hidden [..., H] the student's last hidden states,
    weight [V, H] its head, probs / ids [..., k] the teacher's top-k at the same positions."""
    if rest not in RESTS:
        raise ValueError(f"KL rest mode must be one of {RESTS}; got {rest!r}")
    if probs.shape != ids.shape or probs.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"teacher top-k probs {tuple(probs.shape)} and ids {tuple(ids.shape)} must be [..., k] at "
                         f"the student's positions {tuple(hidden.shape[:-1])}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"teacher token ids must be in [0, {weight.shape[0]}): the teacher's vocabulary differs "
                         "from the student's")
    k = probs.shape[-1]
    kl = _ChunkedTopKL.apply(hidden.reshape(-1, hidden.shape[-1]), weight, probs.reshape(-1, k),
                             ids.reshape(-1, k).long(), rest, chunk_size)
    return kl.view(hidden.shape[:-1])
