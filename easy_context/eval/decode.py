"""Greedy decoding under sequence parallelism, with no KV cache: each step is one teacher-forced forward pass of the
whole sequence over the SP group (``needle.answer_predictions``), checked against a draft.

A pass runs prompt + the tokens decoded so far + the rest of a draft continuation (the reference answer), and reads
the argmax at every answer position. The argmax at a position is what greedy decoding emits there as long as every
token before it is greedy's own, so a pass accepts its argmaxes up to and including the first that differs from
the draft: that is exact greedy decoding, one pass when the model continues with the draft (as EasyContext's
teacher-forced needle check) and at most one pass per token otherwise. ``exact=False`` stops after the first pass:
the teacher-forced argmax at every position (each token predicted from the reference before it).
"""

from __future__ import annotations

import torch

from .needle import answer_predictions


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
