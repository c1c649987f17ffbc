"""Perplexity at a sweep of context lengths, sequence-parallel: the windows each protocol scores, one sequence's
NLL, the sweep, and its results (a resumable store and the CSV).

Protocols (every output states which one was used):

* ``truncate`` (YaRN's and EasyContext's ``--truncate``): at length L, each document's first L - 1 tokens
  after a BOS (L tokens when the tokenizer has no BOS), one forward pass; every token is scored.
* ``sliding`` (Press et al., as in Position Interpolation): each document is cut to the sweep's largest
  length; windows of L tokens (BOS included) start every ``stride`` tokens and each token is scored once,
  in the first window that reaches it, so every length scores the same tokens with at least
  L - 1 - stride tokens of context (the first window: all it has).

Perplexity is exp(total NLL / total scored tokens) over all documents (token-weighted; under ``truncate``
every document scores the same count, so this equals EasyContext's mean of per-document means). NLL sums
come from ``hf.causal_lm_loss``: chunked logits, exact token counts over the whole SP group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..hf.causal_lm import causal_lm_loss
from .model import sp_shard
from .results import ResultsFile, write_csv

Tensor = torch.Tensor
PROTOCOLS = ("truncate", "sliding")
CSV_COLUMNS = ["model", "protocol", "stride", "length", "documents", "tokens", "nll", "perplexity"]


@dataclass(frozen=True)
class Window:
    """Document tokens [begin, end) form one forward pass (after a BOS); tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


def windows(num_tokens: int, length: int, protocol: str = "truncate", stride: int | None = None, *,
            bos: bool = True) -> list[Window]:
    """The forward passes that score a document of ``num_tokens`` tokens (no BOS) at context ``length``
    (BOS included when ``bos``). ``truncate`` needs num_tokens >= length - bos; ``sliding`` covers them all."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown perplexity protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    width = length - int(bos)
    first = 0 if bos else 1  # without a BOS, a window's first token has nothing to be predicted from
    if width < 2 - int(bos):
        raise ValueError(f"length {length} leaves no token to score")
    if protocol == "truncate":
        if num_tokens < width:
            raise ValueError(f"a {num_tokens}-token document is too short to truncate to {length} tokens")
        return [Window(0, width, first)]
    if stride is None or not 1 <= stride <= width - first:
        raise ValueError(f"sliding windows of {length} tokens need a stride in [1, {width - first}]; got {stride}")
    out, done, begin = [], 0, 0
    while done < num_tokens:
        end = min(begin + width, num_tokens)
        out.append(Window(begin, end, max(done, begin + first)))
        done, begin = end, begin + stride
    return out


def window_tensors(doc: list[int] | Tensor, window: Window, bos_id: int | None) -> tuple[Tensor, Tensor]:
    """(input_ids [S], labels [S]) of one window: BOS (if any) + doc[begin:end], labels -100 where unscored."""
    ids = torch.as_tensor(doc[window.begin:window.end], dtype=torch.long)
    labels = ids.clone()
    labels[: window.score_from - window.begin] = -100
    if bos_id is not None:
        ids = torch.cat([torch.tensor([bos_id]), ids])
        labels = torch.cat([torch.tensor([-100]), labels])
    return ids, labels


@torch.no_grad()
def sequence_nll(model, input_ids: Tensor, labels: Tensor) -> tuple[float, int]:
    """Collective over the model's SP group: (summed NLL, number of scored tokens) of one sequence,
    labels HF-style (aligned with input_ids, -100 ignored); the same numbers on every rank."""
    inputs = sp_shard(model, input_ids, labels)
    out = causal_lm_loss(model, inputs.input_ids, inputs.target_ids, inputs.position_ids)
    return float(out.value) * out.num_tokens, out.num_tokens


@dataclass(frozen=True)
class PerplexityResult:
    """One model at one length: documents, scored tokens, summed NLL and exp(NLL / tokens)."""

    length: int
    documents: int
    tokens: int
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def evaluate_perplexity(model, docs: list[list[int]], lengths: list[int], *, protocol: str = "truncate",
                        stride: int | None = None, bos_id: int | None = None,
                        progress: Callable[[int], Any] | None = None, max_length: int | None = None,
                        on_result: Callable[[PerplexityResult], Any] | None = None) -> list[PerplexityResult]:
    """Collective: the perplexity of ``docs`` (token ids without BOS) at each length (module doc).
    Sliding windows run over each document's first ``max_length`` (default max(lengths)) - (BOS) tokens: pass
    the whole sweep's largest length when resuming part of it. ``progress(n)``: n passes done; ``on_result``:
    each length's result as soon as it is complete (save it: a kill later loses nothing)."""
    bos = bos_id is not None
    cut = (max_length or max(lengths)) - int(bos)
    out = []
    for length in lengths:
        nll, tokens = 0.0, 0
        for doc in docs:
            doc = doc[:cut]
            for w in windows(len(doc), length, protocol, stride, bos=bos):
                s, n = sequence_nll(model, *window_tensors(doc, w, bos_id))
                nll += s
                tokens += n
            if progress is not None:
                progress(1)
        out.append(PerplexityResult(length, len(docs), tokens, nll))
        if on_result is not None:
            on_result(out[-1])
    return out


def check_protocol(lengths: list[int], protocol: str, stride: int | None, *, bos: bool = True) -> None:
    """Raise the ValueError ``windows`` would, before any model is loaded."""
    for length in lengths:
        windows(max(lengths), length, protocol, stride, bos=bos)


def describe_protocol(protocol: str, stride: int | None, *, bos: bool, source: str) -> str:
    """One line stating how the numbers were computed, for the CSV header and the plot."""
    if protocol == "truncate":
        what = ("each document's first L - 1 tokens after a BOS" if bos else "each document's first L tokens "
                "(no BOS)") + ", one forward pass, every token scored"
    else:
        what = (f"documents cut to the largest length, L-token windows{' (BOS + L - 1)' if bos else ''} every "
                f"{stride} tokens, each token scored once, in the first window that reaches it")
    return (f"protocol={protocol}{f' stride={stride}' if protocol == 'sliding' else ''}: {what}; perplexity = "
            f"exp(token-weighted mean NLL over all documents); documents: {source}")


def write_perplexity_csv(path: str, rows: list[dict], header: str) -> str:
    """Write ``rows`` (model, protocol, stride, length, documents, tokens, nll, perplexity) as CSV under a
    ``# header`` comment line (read with pandas ``read_csv(path, comment="#")``); atomic; returns path."""
    return write_csv(path, rows, CSV_COLUMNS, header=header)


class PerplexityResults(ResultsFile):
    """A sweep's results: the CSV at ``csv_path`` and, beside it (.json), its settings and one row per (model,
    length), rewritten after every result. Reopening with the same settings resumes (``has``); other settings,
    or a CSV without its .json (an older eval_ppl.py's), raise instead of mixing or overwriting results."""

    def __init__(self, csv_path: str, settings: dict):
        path = os.path.splitext(csv_path)[0] + ".json"
        if path == csv_path:
            raise ValueError(f"--output {csv_path!r} is where the CSV goes (the .json beside it holds the results): "
                             "give a .csv path, e.g. results/ppl.csv")
        if os.path.exists(csv_path) and not os.path.exists(path):
            raise ValueError(f"{csv_path} exists but {path}, the results it is made from, does not (an older "
                             "eval_ppl.py or another program wrote it): give another --output, or delete "
                             f"{csv_path} to start over")
        super().__init__(path, settings, key="rows",
                         remedy=f"give another --output, or delete {path} and {csv_path} to start over")
        self.csv_path = csv_path
        self.header: str = self.saved.get("header", "")

    def has(self, model: str, length: int) -> bool:
        return any(r["model"] == model and int(r["length"]) == int(length) for r in self.records)

    def rows(self) -> list[dict]:
        """Every row, models in the order they first came, each model's lengths ascending."""
        order = {m: i for i, m in reversed(list(enumerate(r["model"] for r in self.records)))}
        return sorted(self.records, key=lambda r: (order[r["model"]], int(r["length"])))

    def add(self, row: dict, header: str) -> None:
        """Record one (model, length) row (model, protocol, stride, length, documents, tokens, nll, perplexity)
        under ``header`` (``describe_protocol``); rewrite the .json, then the CSV, atomically."""
        self.records.append(row)
        self.header = header
        self.save(header=header)
        self.write_csv()

    def write_csv(self) -> str:
        """Every row (``rows``) as the CSV under the header (``write_perplexity_csv``); returns its path."""
        return write_perplexity_csv(self.csv_path, self.rows(), self.header)
