"""The training loss of a CEPE model, as the module handed to accelerate / DeepSpeed: encode the context chunks,
run the decoder window with that memory, then lm_coef x the exact token-mean cross entropy of the decoder's
targets (chunked: no [S, vocab] logits) plus, with teacher top-k given, kl_coef x the token-mean top-k KL
(``distill``).

Sequence parallel (``group``: the SP ProcessGroup), each rank holds its shard of the window and its share of the
chunks; the memory's queries are then the decoder's shards ("sharded", ``sharded.memory_attention``). Both terms
follow ``parallel.loss``'s convention: each rank's part is its local sum over the group's token count, times the
group size for ``grad_reduction="mean"`` (trainers that average gradients).
"""

from __future__ import annotations

import sys

import torch

from ..parallel.loss import DEFAULT_CHUNK, SPLoss, chunked_cross_entropy, sequence_parallel_cross_entropy, token_mean
from .distill import RESTS, topk_kl
from .model import CEPEModel

Tensor = torch.Tensor


class CEPEWithLoss(torch.nn.Module):
    """forward(input_ids, target_ids, position_ids, chunk_ids, chunk_mask=None, teacher_probs=None,
    teacher_ids=None) -> (loss, loss value, number of target tokens) of ``model`` (module doc); chunk_ids None: the
    decoder alone, with no memory. ``group``: the SP group or None (each rank trains whole windows and holds all of
    their chunks)."""

    def __init__(self, model: CEPEModel, *, group=None, kernel: str | None = None, grad_reduction: str = "mean",
                 chunk_size: int = DEFAULT_CHUNK, lm_coef: float = 1.0, kl_coef: float = 0.0, kl_rest: str = "bucket"):
        super().__init__()
        if kl_rest not in RESTS:
            raise ValueError(f"kl_rest must be one of {RESTS}; got {kl_rest!r}")
        self.model, self.config = model, model.config
        self.group, self.kernel, self.grad_reduction, self.chunk_size = group, kernel, grad_reduction, chunk_size
        self.lm_coef, self.kl_coef, self.kl_rest = lm_coef, kl_coef, kl_rest
        if "deepspeed" not in sys.modules:  # no DeepSpeed in this process (importing it would take seconds)
            return
        try:  # ZeRO-3 gathers the head's weight, used outside its module, for us
            from deepspeed.zero import register_external_parameter
        except ImportError:
            return
        register_external_parameter(self, model.head().weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, position_ids: Tensor | None, chunk_ids: Tensor | None,
                chunk_mask: Tensor | None = None, teacher_probs: Tensor | None = None,
                teacher_ids: Tensor | None = None):
        queries = "replicated" if self.group is None else "sharded"
        memory = None if chunk_ids is None else self.model.encode(chunk_ids, chunk_mask, group=self.group,
                                                                  queries=queries, kernel=self.kernel)
        hidden = self.model(input_ids, position_ids, memory)
        weight = self.model.head().weight
        if weight.numel() == 0:
            raise ValueError("the output head's weight is empty here (partitioned by DeepSpeed ZeRO-3, and not "
                             "gathered): build CEPEWithLoss after deepspeed is imported, so that it registers it")
        if self.group is None:
            ce = chunked_cross_entropy(hidden, weight, target_ids, chunk_size=self.chunk_size, reduction="mean")
            lm = SPLoss(ce, ce.detach(), int((target_ids != -100).sum()))
        else:
            lm = sequence_parallel_cross_entropy(hidden, weight, target_ids, group=self.group,
                                                 grad_reduction=self.grad_reduction, chunk_size=self.chunk_size)
        loss, value = self.lm_coef * lm.loss, self.lm_coef * lm.value
        if self.kl_coef and teacher_probs is None:
            raise ValueError("kl_coef > 0 needs the teacher's top-k probabilities and ids for every window position")
        if self.kl_coef:
            kl = topk_kl(hidden, weight, teacher_probs, teacher_ids, rest=self.kl_rest, chunk_size=self.chunk_size)
            if self.group is None:  # this rank alone, as the cross entropy above
                part = SPLoss(kl.mean(), kl.mean().detach(), kl.numel())
            else:
                part = token_mean(kl.sum(), torch.tensor(kl.numel(), device=kl.device), self.group,
                                  self.grad_reduction)
            loss, value = loss + self.kl_coef * part.loss, value + self.kl_coef * part.value
        return loss, value, torch.tensor(lm.num_tokens, device=loss.device)


@torch.no_grad()
def memory_gain(loss_module: torch.nn.Module, inputs: tuple) -> tuple[float, float]:
    """(loss value with the encoder's memory, without it: the decoder alone) of one batch of ``CEPEWithLoss``
    arguments (``data.rank_inputs``' order), through ``loss_module`` (a CEPEWithLoss, or the engine wrapping it)."""
    with_memory = loss_module(*inputs)[1]
    alone = loss_module(*inputs[:3], None, None, *inputs[5:])[1]
    return float(with_memory), float(alone)


def describe_gain(stage: str, with_memory: float, alone: float) -> str:
    """``memory_gain``'s figures as a line for the console, saying what to do when the memory does not help (its
    loss not at least 1% below the decoder's alone)."""
    line = f"the encoder's memory on the last batch: loss {with_memory:.4f}, the decoder alone {alone:.4f}"
    if with_memory < alone - 0.01 * abs(alone):
        return line
    if stage == "warmup":
        return (f"{line}. The cross-attention has not learned to copy from the memory yet: train the warmup longer "
                "or at a higher --lr (with the loss on every token) before the main stage")
    return (f"{line}. The context does not help yet: train longer, or check that the data's evidence lies in the "
            "context chunks, before the window")
