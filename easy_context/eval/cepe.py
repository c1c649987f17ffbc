"""Evaluation of a CEPE model: perplexity of the decoder's last window as the encoder's context grows, and needles
placed only in the encoder's context with the question in the decoder's window.

Perplexity (the paper's protocol): each document is cut to the largest context + the window; the window is its
last ``window`` tokens, the context the C tokens right before it (C = 0: the decoder alone), in chunks of
``chunk_size``; the loss is on the window's last ``score_tokens`` tokens only (the paper: 256), so every context
length scores the same tokens. Perplexity = exp(total NLL / scored tokens) over all documents.

Needle: the context is C tokens: BOS, the template's prefix, then haystack with the needle inserted at ``depth`` %
of it (after a sentence end, as ``eval.needle``); the window continues the haystack where the context stopped and
ends with the question and the answer. Scored teacher-forced: correct only if the argmax at every answer position
is the answer's token.

With a process ``group`` the memory is spread over its ranks (each encodes its share of the chunks) and every
rank runs the whole window ("replicated" queries): the results are the same on every rank.

The eval scripts' side: a model directory holding ``cepe_config.json`` is a CEPE model; ``add_cepe_args`` adds
the flags of its sweep, ``check_cepe_flags`` refuses those that do not fit the models given, and ``check_model``
checks the sweep against the saved configs before any weights load.
"""

from __future__ import annotations

import argparse
import math
import random
from typing import Any, Callable, Iterable

import torch

from ..cepe.config import CEPEConfig, check_lengths
from ..cepe.data import to_chunks
from ..cepe.io import CONFIG_FILE, is_cepe_dir, read_cepe_config
from ..cepe.model import CEPEModel
from ..cepe.sharded import chunk_range, memory_rank_size
from ..hf.models import load_config
from ..parallel.inputs import shift_labels
from ..parallel.loss import chunked_cross_entropy
from ..world import haystack
from ..world.default import retrieval_ids
from .lengths import int_at_least
from .needle import NeedleTask, haystack_tokens, insertion_point
from .perplexity import PerplexityResults
from .results import write_csv

Tensor = torch.Tensor
SCORE_TOKENS = 256
WINDOW = 256  # the evals' default decoder window
CONTEXT_REACH = 16  # the default sweep's largest context, in decoder windows (the paper's 16x)
PPL_COLUMNS = ["model", "window", "chunk", "context", "length", "documents", "tokens", "nll", "perplexity"]
PPL_TITLE = "CEPE: perplexity of the last window vs total context"
CEPE_FLAGS = ("decoder", "window", "chunk_size", "contexts", "score_tokens")  # the dests ``add_cepe_args`` adds
_CONTEXTS = "a CEPE sweep grows the encoder's context after a --window-token window: give --contexts"
_CHUNKS = "the processes share the encoder's chunks; the decoder window runs whole on each"
_ROPE = "the decoder keeps its own RoPE; the long context reaches it through the encoder"
NOT_FOR_CEPE = {  # the dests of the evals' shared flags that do not apply to a CEPE model: why
    "lengths": _CONTEXTS, "min_length": _CONTEXTS, "max_length": _CONTEXTS, "length_step": _CONTEXTS,
    "backend": _CHUNKS, "ulysses_degree": _CHUNKS, "rope_theta": _ROPE, "rope_scaling": _ROPE}


def context_sweep(window: int, largest: int, chunk_size: int) -> list[int]:
    """0, then encoder context lengths doubling from one chunk up to ``largest`` tokens (included)."""
    out, n = [0], chunk_size
    while n < largest:
        out.append(n)
        n *= 2
    return out + [largest]


def sweep_contexts(contexts: Iterable[int] | None, window: int, chunk_size: int, *, zero: bool = True) -> list[int]:
    """The sorted distinct context lengths of a sweep: ``contexts``, else ``context_sweep`` up to
    ``CONTEXT_REACH`` windows (without 0 unless ``zero``: a needle needs a context)."""
    if contexts:
        return sorted(set(contexts))
    return [c for c in context_sweep(window, CONTEXT_REACH * window, chunk_size) if zero or c]


def default_score_tokens(window: int, score_tokens: int | None = None) -> int:
    """The tokens a window's perplexity scores: ``score_tokens``, else min(``SCORE_TOKENS``, window / 2)."""
    return score_tokens or min(SCORE_TOKENS, window // 2)


def describe_perplexity(window: int, chunk_size: int | None, score_tokens: int, documents: str) -> str:
    """One line stating how a CEPE perplexity sweep was computed, for the CSV header and the plot (chunk_size None:
    each model's own)."""
    chunks = f"chunks of {chunk_size}" if chunk_size else "each model's chunks (the chunk column)"
    return (f"protocol=cepe: decoder window {window} tokens + C encoder tokens in {chunks}; "
            f"perplexity = exp(token-weighted mean NLL) of the window's last {score_tokens} tokens; "
            f"documents: {documents}")


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
                                progress: Callable[[int], Any] | None = None, largest_context: int | None = None,
                                on_result: Callable[[dict], Any] | None = None) -> list[dict]:
    """One row per context length (module doc): {window, chunk, context, length (context + window), documents,
    tokens, nll, perplexity}. Documents are cut to ``largest_context`` (default max(contexts)) + the window: pass
    the whole sweep's largest when resuming part of it. ``progress(n)``: n windows done; ``on_result``: each
    row as soon as it is complete (save it: a kill later loses nothing)."""
    largest = max(contexts) if largest_context is None else largest_context
    check_sweep(docs, window=window, contexts=[*contexts, largest], score_tokens=score_tokens)
    rows = []
    for c in contexts:
        nll, tokens = 0.0, 0
        for doc in docs:
            doc = torch.as_tensor(doc[:largest + window], dtype=torch.long)
            win = doc[-window:]
            labels = win.clone()
            labels[:window - score_tokens] = -100
            s, n = window_nll(model, win, labels, doc[len(doc) - window - c:len(doc) - window], chunk_size=chunk_size,
                              group=group, pad_id=pad_id)
            nll, tokens = nll + s, tokens + n
            if progress is not None:
                progress(1)
        rows.append(dict(window=window, chunk=chunk_size, context=c, length=c + window, documents=len(docs),
                         tokens=tokens, nll=nll, perplexity=math.exp(nll / tokens)))
        if on_result is not None:
            on_result(rows[-1])
    return rows


class ContextPerplexityResults(PerplexityResults):
    """``PerplexityResults`` of CEPE rows (``PPL_COLUMNS``): one per model and length (context + window, the
    window fixed by the settings), resumable the same way, the CSV in CEPE's columns."""

    def write_csv(self) -> str:
        return write_csv(self.csv_path, self.rows(), PPL_COLUMNS, header=self.header)


def needle_example(task: NeedleTask, context: int, window: int, depth: float, number: str) -> dict:
    """{context [C], window [W], answer_start (in the window), needle_at (in the context)} of one needle cell;
    the template's prefix (if any) opens the context, after the BOS."""
    tok, t = task.tokenizer, task.template

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    head = ([] if tok.bos_token_id is None else [tok.bos_token_id]) + encode(t.prefix)
    needle = encode(t.needle.format(key=task.key, number=number))
    question, answer = encode(t.question.format(key=task.key)), encode(t.answer.format(number=number))
    room, tail = context - len(head) - len(needle), window - len(question) - len(answer)
    if room < 0 or tail < 0:
        raise ValueError(f"a needle cell needs a context of at least {len(head) + len(needle)} tokens (got "
                         f"{context}) and a window of at least {len(question) + len(answer)} (got {window})")
    if room + tail > len(task.haystack):
        raise ValueError(f"the haystack has {len(task.haystack)} tokens, {room + tail} are needed")
    hay = task.haystack[:room]
    at = insertion_point(hay, depth, task.ends)
    return dict(context=head + hay[:at] + needle + hay[at:], window=task.haystack[room:room + tail] + question + answer,
                answer_start=window - len(answer), needle_at=len(head) + at)


def check_needle_sweep(task: NeedleTask, contexts: list[int], window: int, samples: int) -> None:
    """Raise ``needle_example``'s ValueError before any forward pass: a context or window too short for a cell of
    some sample, a haystack too short for the largest context."""
    for s in range(samples):
        needle_example(task, min(contexts), window, 0.0, task.number(s))
    needle_example(task, max(contexts), window, 0.0, task.number(0))


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


# ---- the eval scripts' side ---------------------------------------------------------------------------------------

def add_cepe_args(parser: argparse.ArgumentParser, *, perplexity: bool) -> None:
    """The flags of a CEPE model's sweep (``CEPE_FLAGS``; --score-tokens only for ``perplexity``), in their own
    group of the help."""
    g = parser.add_argument_group(
        "CEPE models", f"A model directory holding {CONFIG_FILE} (a CEPE training run's OUTPUT/model) is a CEPE\n"
        "model: its decoder reads a --window-token window, its encoder the --contexts tokens before it.\n"
        "These flags apply only to such a model.")
    g.add_argument("--decoder", help="load the frozen decoder from here (default: the path the model records)")
    g.add_argument("--window", type=int_at_least(2), default=WINDOW, help="decoder tokens")
    g.add_argument("--chunk-size", type=int_at_least(1), help="encoder chunk length (default: the model's)")
    if perplexity:
        g.add_argument("--contexts", type=int_at_least(0), nargs="+",
                       help="encoder context lengths in tokens, 0: the decoder alone (default: 0, one chunk, "
                            f"doubling to {CONTEXT_REACH} x the window)")
        g.add_argument("--score-tokens", type=int_at_least(1),
                       help=f"perplexity over the window's last N tokens, the same at every context (default: "
                            f"min({SCORE_TOKENS}, window / 2))")
    else:
        g.add_argument("--contexts", type=int_at_least(1), nargs="+",
                       help="encoder context lengths in tokens, the needle among them (default: one chunk, "
                            f"doubling to {CONTEXT_REACH} x the window)")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, dests: Iterable[str]) -> set[str]:
    """Which of ``dests`` the command line ``argv`` sets, whatever the value (the default given by hand too):
    ``argv`` parsed again into a namespace where each starts as a marker that only a given flag replaces."""
    unset = object()
    dests = [d for d in dests if any(a.dest == d for a in parser._actions)]
    namespace = argparse.Namespace(**{d: unset for d in dests})
    parser.parse_known_args(argv, namespace)
    return {d for d in dests if getattr(namespace, d) is not unset}


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.option_strings[-1] for a in parser._actions if a.dest == dest)


def check_cepe_flags(parser: argparse.ArgumentParser, argv: list[str] | None, models: list[str],
                     not_for_cepe: dict[str, str]) -> bool:
    """Whether ``models`` are CEPE models (directories holding ``cepe_config.json``), after ``parser.error`` (a
    usage error, exit 2) for a mix of CEPE and other models, a CEPE flag for other models, or, for CEPE models, a
    flag of ``not_for_cepe`` ({dest: why it does not apply}) given on the command line."""
    cepe = [m for m in models if is_cepe_dir(m)]
    if cepe and len(cepe) < len(models):
        other = next(m for m in models if m not in cepe)
        parser.error(f"{cepe[0]} is a CEPE model ({CONFIG_FILE}) and {other} is not: their sweeps differ, "
                     "evaluate them in separate runs")
    if not cepe:
        wrong = sorted(given_flags(parser, argv, CEPE_FLAGS))
        if wrong:
            parser.error(f"{', '.join(_flag(parser, d) for d in wrong)}: only for a CEPE model, a directory "
                         f"holding {CONFIG_FILE}; {models[0]} holds none")
        return False
    given = given_flags(parser, argv, not_for_cepe)
    by_reason: dict[str, list[str]] = {}
    for dest in (d for d in not_for_cepe if d in given):
        by_reason.setdefault(not_for_cepe[dest], []).append(_flag(parser, dest))
    if by_reason:
        parser.error(f"{cepe[0]} is a CEPE model ({CONFIG_FILE}): " + "; ".join(
            f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply to it ({why})"
            for why, flags in by_reason.items()))
    return True


def check_model(path: str, *, window: int, chunk_size: int | None = None, largest_context: int = 0,
                decoder: str | None = None, allow_extrapolation: bool = False) -> CEPEConfig:
    """The CEPE config saved in ``path``, once a sweep of a ``window``-token decoder window and up to
    ``largest_context`` encoder tokens in chunks of ``chunk_size`` (default: the model's) is checked to fit it
    (``cepe.config.check_lengths``) from config files alone: ValueError saying what to change."""
    cfg, source = read_cepe_config(path)
    chunk = chunk_size or cfg.chunk_size
    check_lengths(cfg, load_config(decoder or source), window=window, chunk_size=chunk,
                  context_chunks=max(1, -(-largest_context // chunk)), allow_extrapolation=allow_extrapolation)
    return cfg
