"""Evaluation of a CEPE model: perplexity of the decoder's last window as the encoder's context grows, and needles
placed only in the encoder's context with the question in the decoder's window.

Perplexity (the paper's protocol): each document is cut to the largest context + the window; the window is its
last ``window`` tokens, the context the C tokens right before it (C = 0: the decoder alone), in chunks of
``chunk_size``; the loss is on the window's last ``score_tokens`` tokens only (the paper: 256), so every context
length scores the same tokens. Perplexity = exp(total NLL / scored tokens) over all documents.

Needle: the context is C haystack tokens (BOS first) with the needle inserted at ``depth`` % of them (after a
sentence end, as ``eval.needle``); the window continues the haystack where the context stopped and ends with the
question and the answer. Scored teacher-forced: correct only if the argmax at every answer position is the
answer's token.

With a process ``group`` the memory is spread over its ranks (each encodes its share of the chunks) and every
rank runs the whole window ("replicated" queries): the results are the same on every rank.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch

from ..cepe.data import to_chunks
from ..cepe.model import CEPEModel
from ..cepe.sharded import chunk_range, memory_rank_size
from ..parallel.inputs import shift_labels
from ..parallel.loss import chunked_cross_entropy
from ..world import haystack
from ..world.default import retrieval_ids
from .needle import NeedleTask, haystack_tokens, insertion_point

Tensor = torch.Tensor
SCORE_TOKENS = 256
PPL_COLUMNS = ["model", "window", "context", "length", "documents", "tokens", "nll", "perplexity"]


def context_sweep(window: int, largest: int, chunk_size: int) -> list[int]:
    """0, then encoder context lengths doubling from one chunk up to ``largest`` tokens (included)."""
    out, n = [0], chunk_size
    while n < largest:
        out.append(n)
        n *= 2
    return out + [largest]


def _memory(model: CEPEModel, context: Tensor, chunk_size: int, group, pad_id: int):
    """The memory of one context [C] (None when empty), this rank's share of its chunks when ``group`` is given."""
    if context.numel() == 0:
        return None
    chunks, mask = to_chunks(context[None], chunk_size, pad_id)
    rank, world = memory_rank_size(group)
    mine = chunk_range(chunks.shape[1], rank, world)
    chunks = chunks[:, mine.start:mine.stop]
    mask = None if mask is None else mask[:, mine.start:mine.stop]
    return model.encode(chunks, mask, group=group, queries="replicated")


@torch.no_grad()
def window_nll(model: CEPEModel, window: Tensor, labels: Tensor, context: Tensor, *, chunk_size: int, group=None,
               pad_id: int = 0) -> tuple[float, int]:
    """(summed NLL, scored tokens) of a decoder window [W] (labels [W], HF style: -100 unscored) reading the
    encoder context [C] (token ids; empty: none). Collective over ``group`` when given."""
    device = next(model.parameters()).device
    memory = _memory(model, context.to(device), chunk_size, group, pad_id)
    hidden = model(window[None].to(device), memory=memory)
    targets = shift_labels(labels[None].to(device))
    nll = chunked_cross_entropy(hidden, model.head().weight, targets, reduction="sum")
    return float(nll), int((targets != -100).sum())


def check_sweep(docs: list[list[int]], *, window: int, contexts: list[int], score_tokens: int) -> None:
    """ValueError before any forward pass: a window too short to score ``score_tokens``, a document shorter than
    the largest context + the window."""
    if not 1 <= score_tokens < window:
        raise ValueError(f"--score-tokens {score_tokens} must be in [1, window - 1 = {window - 1}]")
    need = max(contexts) + window
    short = [i for i, d in enumerate(docs) if len(d) < need]
    if short:
        raise ValueError(f"document {short[0]} has {len(docs[short[0]])} tokens; the largest context + the window "
                         f"need {need}: use longer documents or fewer context tokens")


def evaluate_context_perplexity(model: CEPEModel, docs: list[list[int]], *, window: int, contexts: list[int],
                                chunk_size: int, score_tokens: int = SCORE_TOKENS, group=None, pad_id: int = 0,
                                progress: Callable[[int], Any] | None = None) -> list[dict]:
    """One row per context length (module doc): {window, context, length (context + window), documents, tokens,
    nll, perplexity}. ``progress(n)``: n windows done."""
    check_sweep(docs, window=window, contexts=contexts, score_tokens=score_tokens)
    rows = []
    for c in contexts:
        nll, tokens = 0.0, 0
        for doc in docs:
            doc = torch.as_tensor(doc[:max(contexts) + window], dtype=torch.long)
            win = doc[-window:]
            labels = win.clone()
            labels[:window - score_tokens] = -100
            s, n = window_nll(model, win, labels, doc[len(doc) - window - c:len(doc) - window], chunk_size=chunk_size,
                              group=group, pad_id=pad_id)
            nll, tokens = nll + s, tokens + n
            if progress is not None:
                progress(1)
        rows.append(dict(window=window, context=c, length=c + window, documents=len(docs), tokens=tokens, nll=nll,
                         perplexity=math.exp(nll / tokens)))
    return rows


def needle_example(task: NeedleTask, context: int, window: int, depth: float, number: str) -> dict:
    """{context [C], window [W], answer_start (in the window), needle_at (in the context)} of one needle cell."""
    tok, t = task.tokenizer, task.template

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    needle = encode(t.needle.format(key=task.key, number=number))
    question, answer = encode(t.question.format(key=task.key)), encode(t.answer.format(number=number))
    room, tail = context - len(bos) - len(needle), window - len(question) - len(answer)
    if room < 0 or tail < 0:
        raise ValueError(f"a needle cell needs a context of at least {len(bos) + len(needle)} tokens (got "
                         f"{context}) and a window of at least {len(question) + len(answer)} (got {window})")
    if room + tail > len(task.haystack):
        raise ValueError(f"the haystack has {len(task.haystack)} tokens, {room + tail} are needed")
    hay = task.haystack[:room]
    at = insertion_point(hay, depth, task.ends)
    return dict(context=bos + hay[:at] + needle + hay[at:], window=task.haystack[room:room + tail] + question + answer,
                answer_start=window - len(answer), needle_at=len(bos) + at)


@torch.no_grad()
def needle_record(model: CEPEModel, task: NeedleTask, *, context: int, window: int, depth: float, sample: int,
                  chunk_size: int, group=None, pad_id: int = 0) -> dict:
    """One cell sample's record {length (the context's tokens), depth, sample, number, predicted, correct,
    needle_at}, scored teacher-forced (module doc). Collective over ``group`` when given."""
    number = task.number(sample)
    ex = needle_example(task, context, window, depth, number)
    device = next(model.parameters()).device
    memory = _memory(model, torch.tensor(ex["context"], device=device), chunk_size, group, pad_id)
    ids = torch.tensor(ex["window"], device=device)
    hidden = model(ids[None], memory=memory)[0]
    start = ex["answer_start"]
    answer = ids[start:]
    logits = hidden[start - 1:len(ids) - 1].float() @ model.head().weight.float().t()
    pred = logits.argmax(dim=-1)
    return dict(length=context, depth=depth, sample=sample, number=number,
                predicted=task.tokenizer.decode(pred.tolist()), correct=bool(torch.equal(pred, answer)),
                needle_at=ex["needle_at"])


def default_documents(tokenizer, count: int, length: int, seed: int = 12345) -> list[list[int]]:
    """``count`` held-out generated retrieval documents of ``length`` tokens (the built-in world's text, no BOS)."""
    return [retrieval_ids(tokenizer, length + 1, seed=seed * 7919 + i)[1:] for i in range(count)]


def needle_task(tokenizer, window: int, largest_context: int, *, key: str | None = None, seed: int = 0) -> NeedleTask:
    """The needle sweep's task: generated haystack enough for the largest context and the window, key drawn
    from the built-in keys by ``seed`` (None) or given."""
    hay, _ = haystack_tokens(tokenizer, largest_context + window)
    key = key or random.Random(seed).choice(haystack.KEYS)
    return NeedleTask(tokenizer, hay, key=key, seed=seed)
