"""Perplexity at a sweep of context lengths, sequence-parallel, plus the plumbing the needle eval shares:
load a model for sequence-parallel evaluation, check lengths against its position limit, shard one sequence.

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

import argparse
import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from ..attention.comm import rank_and_size
from ..attention.layouts import num_chunks
from ..attention.registry import BACKENDS
from ..attention.usp import new_usp_group
from ..hf.attention import apply_seq_parallel_monkey_patch, causal_lm_loss, registered_backend, self_check_config
from ..hf.models import load_config, load_model, position_limit
from ..parallel.groups import group_layout, group_rank_size
from ..parallel.inputs import SeqParallelInputs, prepare_seq_parallel_inputs
from ..train.data import load_raw

Tensor = torch.Tensor
PROTOCOLS = ("truncate", "sliding")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


# ---- shared by the evals: lengths, model loading, one sharded sequence -------------------------------------

def length_sweep(lengths: Iterable[int] | None = None, min_length: int | None = None,
                 max_length: int | None = None, step: int | None = None) -> list[int]:
    """Sorted distinct lengths: the explicit list, else min..max every ``step`` (no step: doubling from min).
    ValueError, naming the flag, for a length below 2 tokens, min above max, or a step below 1."""
    if lengths:
        out = sorted(set(int(x) for x in lengths))
        if out[0] < 2:
            raise ValueError(f"--lengths must be at least 2 tokens each (one to predict from, one to score); "
                             f"got {out[0]}")
    elif min_length is not None and max_length is not None:
        for flag, n in (("--min-length", min_length), ("--max-length", max_length)):
            if n < 2:  # checked first: doubling from 0 or a negative length never ends
                raise ValueError(f"{flag} must be at least 2 tokens (one to predict from, one to score); got {n}")
        if min_length > max_length:
            raise ValueError(f"--min-length {min_length} is above --max-length {max_length}")
        if step is not None and step < 1:
            raise ValueError(f"--length-step must be at least 1 token (or leave it out to double); got {step}")
        out, n = [], min_length
        while n <= max_length:
            out.append(n)
            n = n + step if step else n * 2
        if not step and out[-1] != max_length:
            out.append(max_length)
    else:
        raise ValueError("give the lengths to evaluate: a list, or a min and max length (and a step)")
    return out


def check_lengths(lengths: Iterable[int], config, *, allow_extrapolation: bool = False,
                  rope_theta: float | None = None) -> None:
    """Raise a ValueError if a length is above the config's position limit (``models.position_limit``),
    unless extrapolation is allowed or the RoPE base was changed by hand (``rope_theta``: limit unknown)."""

    limit = position_limit(config)
    longest = max(lengths)
    if longest <= limit or allow_extrapolation or rope_theta is not None or limit <= 0:
        return
    raise ValueError(f"length {longest} is above the model's position limit of {limit} tokens (max_position_"
                     f"embeddings, times the factor of a RoPE scaling): evaluate at most {limit} tokens, extend the "
                     "RoPE (--rope-scaling yarn:factor=N, or --rope-theta), or pass --allow-extrapolation to "
                     "measure the model beyond its training length on purpose (e.g. a 'before extension' run)")


def eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model dtype for ``name``; "auto": bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``; argparse reports anything else as a usage error naming the flag."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}; got {value}")
        return value

    parse.__name__ = "integer"  # what argparse calls a value it cannot convert
    return parse


def add_eval_model_args(parser) -> None:
    """The flags both evals share: sequence-parallel backend, dtype, RoPE overrides, position-limit escape."""
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="zigzag_ring")
    parser.add_argument("--ulysses-degree", type=int_at_least(1),
                        help="usp backend: Ulysses degree (default: all processes)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32")
    parser.add_argument("--rope-theta", type=float, help="override RoPE theta (disables the position-limit check)")
    parser.add_argument("--rope-scaling", help="e.g. yarn:factor=8 (raises the position limit by the factor)")
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="allow lengths above the model's position limit (max_position_embeddings x RoPE "
                             "scaling factor), e.g. to show a model before extension beyond its training length")


def load_eval_model(name_or_path: str, device: torch.device, *, backend: str | None = "zigzag_ring",
                    dtype: torch.dtype = torch.float32, rope_theta: float | None = None,
                    rope_scaling: str | dict | None = None, ulysses_degree: int | None = None):
    """A causal LM in eval mode on ``device`` whose attention runs ``backend`` over all launched processes
    (None: plain sdpa, for generation). With world > 1 the plumbing is first proven exact on a 2-layer random
    probe of the same config (``self_check_config``), before the weights load. Not on the trained model itself:
    in bf16, a trained model's sharpened attention drifts from sdpa's by more than the half-precision tolerance
    with nothing wrong (5e-2 relative on the 8-layer proof model, whose logits still agreed to 1.2e-2)."""

    _, world = rank_and_size(None)
    group = None
    if backend == "usp":

        ulysses = ulysses_degree or world
        if world % ulysses:
            raise ValueError(f"--ulysses-degree {ulysses} must divide the number of processes {world}")
        group = new_usp_group(ulysses_degree=ulysses, ring_degree=world // ulysses)
    config = load_config(name_or_path, rope_theta=rope_theta, rope_scaling=rope_scaling)
    if backend is not None and world > 1:
        self_check_config(config, backend, group=group, device=device)
    with device:  # transformers loads the weights straight onto the device
        model = load_model(name_or_path, dtype=dtype, config=config)
    model.to(device).eval()
    if backend is not None:
        apply_seq_parallel_monkey_patch(backend, model, group)
    return model


def sp_shard(model, input_ids: Tensor, labels: Tensor | None = None, pad_id: int = 0) -> SeqParallelInputs:
    """This rank's shard of ONE sequence (input_ids [S], labels [S] HF-style or None) for ``model``'s
    sequence-parallel attention (unpatched model: the whole sequence), padded at the END to the multiple
    the layout needs. Padding is causal-safe: no real position attends to it, and its labels are ignored."""
    device = next(model.parameters()).device
    reg = registered_backend(model)
    if reg is None:  # unpatched: one contiguous piece
        layout, world = "contiguous", 1
    else:
        layout, world = group_layout(reg.backend.layout, reg.group), group_rank_size(reg.group)[1]
    pad = -input_ids.numel() % num_chunks(layout, world)
    ids = torch.cat([input_ids.long(), input_ids.new_full((pad,), pad_id).long()])[None].to(device)
    if labels is not None:
        labels = torch.cat([labels.long(), labels.new_full((pad,), -100).long()])[None].to(device)
    if reg is None:
        return prepare_seq_parallel_inputs("ring", ids, labels, rank=0, world=1)
    return prepare_seq_parallel_inputs(reg.backend.name, ids, labels, group=reg.group)


# ---- perplexity ---------------------------------------------------------------------------------------------

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
                nll, tokens = nll + s, tokens + n
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
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = ["model", "protocol", "stride", "length", "documents", "tokens", "nll", "perplexity"]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})
    os.replace(tmp, path)
    return path


def settings_diff(old: dict, new: dict) -> str:
    """"key: old there, new now" for every key whose value differs between two settings dicts."""
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file, then os.replace), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class PerplexityResults:
    """A sweep's results: the CSV at ``csv_path`` and, beside it (.json), its settings and one row per (model,
    length), rewritten after every result. Reopening with the same settings resumes (``has``); other settings,
    or a CSV without its .json (an older eval_ppl.py's), raise instead of mixing or overwriting results."""

    def __init__(self, csv_path: str, settings: dict):
        self.csv_path, self.path = csv_path, os.path.splitext(csv_path)[0] + ".json"
        if self.path == csv_path:
            raise ValueError(f"--output {csv_path!r} is where the CSV goes (the .json beside it holds the results): "
                             "give a .csv path, e.g. results/ppl.csv")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.records: list[dict] = []
        self.header = ""
        if os.path.exists(self.path):
            with open(self.path) as f:
                data = json.load(f)
            old = data.get("settings", {})
            if old != self.settings:
                diff = settings_diff(old, self.settings)
                raise ValueError(f"{self.path} holds results of different settings ({diff}); give another "
                                 f"--output, or delete {self.path} and {csv_path} to start over")
            self.records, self.header = data.get("rows", []), data.get("header", "")
        elif os.path.exists(csv_path):
            raise ValueError(f"{csv_path} exists but {self.path}, the results it is made from, does not (an older "
                             "eval_ppl.py or another program wrote it): give another --output, or delete "
                             f"{csv_path} to start over")

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
        write_json(self.path, {"settings": self.settings, "header": header, "rows": self.records})
        self.write_csv()

    def write_csv(self) -> str:
        """Every row (``rows``) as the CSV under the header (``write_perplexity_csv``); returns its path."""
        return write_perplexity_csv(self.csv_path, self.rows(), self.header)


# ---- documents ----------------------------------------------------------------------------------------------

def text_dir_rows(path: str) -> Iterator[dict]:
    """One row {"text": ...} per .txt file of ``path``, sorted by name; ValueError when there are none."""
    if not os.path.isdir(path):
        raise ValueError(f"text directory {path!r} does not exist")
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
        raise ValueError(f"text directory {path!r} has no .txt files")
    for name in files:
        with open(name, encoding="utf-8") as f:
            yield {"text": f.read()}


def dataset_rows(spec: str, *, subset: str | None = None, split: str = "test") -> Iterable[dict]:
    """Rows of a dataset: a ``save_to_disk`` folder, a .jsonl/.json/.parquet file, or a hub name (streamed)."""

    return load_raw(spec, split, subset=subset, streaming=not os.path.exists(spec))


def collect_documents(rows: Iterable[dict], tokenizer, *, min_tokens: int, feature: str | None = None,
                      samples: int | None = None) -> tuple[list[list[int]], int]:
    """(documents, number skipped): token ids without a leading BOS of rows with at least ``min_tokens``,
    the first ``samples`` of them. A row gives pre-tokenized ``input_ids`` or text in ``feature`` (default:
    input_ids if present, else "text"). ValueError if no document is long enough."""
    docs, skipped = [], 0
    bos = tokenizer.bos_token_id
    for row in rows:
        column = feature or ("input_ids" if "input_ids" in row else "text")
        if column not in row:
            raise ValueError(f"the dataset has columns {sorted(row)}: name the text column with --feature")
        value = row[column]
        if isinstance(value, str):
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(x) for x in value]
            if ids and bos is not None and ids[0] == bos:
                ids = ids[1:]  # every window gets its own BOS
        if len(ids) < min_tokens:
            skipped += 1
            continue
        docs.append(ids)
        if samples is not None and len(docs) >= samples:
            break
    if not docs:
        raise ValueError(f"no document has the {min_tokens} tokens the largest length needs ({skipped} were "
                         "shorter): use shorter lengths or longer documents")
    return docs, skipped
