"""Greedy decoding under sequence parallelism, with no KV cache: each step is one teacher-forced forward pass of the
whole sequence over the SP group (``needle.answer_predictions``), checked against a draft.

A pass runs prompt + the tokens decoded so far + the rest of a draft continuation (the reference answer), and reads
the argmax at every answer position. The argmax at a position is what greedy decoding emits there as long as every
token before it is greedy's own, so a pass accepts its argmaxes up to and including the first that differs from
the draft: that is exact greedy decoding, one pass when the model continues with the draft (as EasyContext's
teacher-forced needle check) and at most one pass per token otherwise. ``exact=False`` stops after the first pass:
the teacher-forced argmax at every position (each token predicted from the reference before it).

On one process with the model's own attention, ``cached_greedy_tokens`` decodes as ``generate`` does: one prefill
pass that keeps a KV cache, then one token per step, whatever the model gets wrong.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ..hf.attention import registered_backend
from .needle import answer_predictions, head_logits

SCORINGS = ("greedy", "forward")


@torch.no_grad()
def greedy_tokens(model, prompt_ids: list[int], draft_ids: list[int], *, exact: bool = True) -> tuple[list[int], int]:
    """Collective over the model's SP group: (the ``len(draft_ids)`` tokens greedy decoding appends to
    ``prompt_ids``, forward passes run), the same on every rank (module doc). ``exact=False``: one pass,
    teacher-forced argmaxes."""
    if not prompt_ids or not draft_ids:
        raise ValueError(f"greedy decoding needs a prompt and a draft; got {len(prompt_ids)} and {len(draft_ids)} "
                         "tokens")
    n, out, passes = len(draft_ids), [], 0
    while len(out) < n:
        fed = out + list(draft_ids[len(out):])
        pred = answer_predictions(model, list(prompt_ids) + fed, len(prompt_ids), n)
        passes += 1
        if not exact:
            return pred, passes
        for j in range(len(out), n):
            out.append(pred[j])
            if pred[j] != fed[j]:  # greedy left the draft: later argmaxes saw a token greedy would not have made
                break
    return out, passes


@torch.no_grad()
def cached_greedy_tokens(model, prompt_ids: list[int], n: int) -> tuple[list[int], int]:
    """This process alone, the model's own attention: (the ``n`` tokens greedy decoding appends to ``prompt_ids``,
    1 full pass). A KV cache, one token per step; each argmax over float32 logits, as ``greedy_tokens``."""
    if registered_backend(model) is not None:
        raise ValueError("cached greedy decoding runs the model's own attention on one process; this model's "
                         "attention is sequence-parallel: load it with backend=None, or decode with greedy_tokens")
    if not prompt_ids or n < 1:
        raise ValueError(f"greedy decoding needs a prompt and at least one token; got {len(prompt_ids)} and {n}")
    device = next(model.parameters()).device
    step = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = _cache_kwarg(model.base_model, DynamicCache(config=model.config))
    out = []
    while len(out) < n:
        body = model.base_model(input_ids=step, use_cache=True, **cache)
        token = head_logits(model, body.last_hidden_state[0, -1:]).argmax(dim=-1)
        out.append(int(token))
        step = token.view(1, 1)
    return out, 1


def _cache_kwarg(body, cache) -> dict:
    # transformers 5.2x renamed the decoder body's past_key_values argument to cache; pass the name it takes
    name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    return {name: cache}


def decode_answer(model, prompt_ids: list[int], draft_ids: list[int], scoring: str) -> tuple[list[int], int]:
    """(the ``len(draft_ids)`` tokens the model answers after ``prompt_ids``, full passes run). ``greedy``: exact
    greedy decoding, with a KV cache when the model's own attention runs (one process), else sequence-parallel
    passes checked against the draft; ``forward``: one teacher-forced pass. Collective when sequence-parallel."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    if scoring == "greedy" and registered_backend(model) is None:
        return cached_greedy_tokens(model, prompt_ids, len(draft_ids))
    return greedy_tokens(model, prompt_ids, draft_ids, exact=scoring == "greedy")
