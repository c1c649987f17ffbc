"""Needle in a haystack over lengths x depths: a random number hidden in filler text, scored the way
EasyContext's eval_needle does it (one teacher-forced forward pass, sequence-parallel) or by generation.

A cell's prompt has exactly ``length`` tokens, answer included: [BOS] + template prefix + the haystack's
first tokens with the needle inserted at ``depth`` % of them (moved forward to just after the next token
that ends a sentence, found by decoding the haystack's tokens) + the question; then the answer. Every piece
is tokenized on its own, as EasyContext did and as ``world.default.retrieval_ids`` builds the default model's data.
The haystack (generated filler, the standard library's documentation (``world.real_text``), or a directory of .txt
files read in name order) is tokenized once.

Teacher-forced scoring: the answer is appended, and the cell is correct only if the argmax prediction at
every answer position is the answer's token (= greedy decoding starts with exactly the answer). Logits
are computed only at those positions (never [S, vocab]). Generation scoring (``generate_answer``) greedily
decodes on one process from the full prompt and is right when the first number in the text is the needle's:
meant for small lengths.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..hf.attention import registered_backend
from ..parallel.groups import group_rank_size, sp_process_group
from ..world import haystack, real_text
from .documents import text_files
from .model import sp_shard
from .results import ResultsFile, write_csv

Tensor = torch.Tensor
SCORINGS = ("forward", "generate")
GENERATED = "generated"  # the built-in filler haystack; "pydoc" and folders are real text
SENTENCE_ENDS = (".", "!", "?")
FILLER_SEED = 0
MAX_DEPTHS = 1001  # a depth step of 0.1%: more rows than a heatmap can show
_VOCAB_CHUNK = 32768  # output-head rows per float32 matmul when computing the answer logits


@dataclass(frozen=True)
class Template:
    """Format strings of the prompt pieces: ``needle`` ({key}, {number}), ``question`` ({key}), ``answer``
    ({number}); ``prefix`` comes before the haystack."""

    prefix: str
    needle: str
    question: str
    answer: str


TEMPLATES = {
    # haystack.py's format: what the embedded default model is trained on.
    "default": Template("", haystack.NEEDLE, haystack.QUESTION, haystack.ANSWER),
    # EasyContext's eval_needle.py, verbatim (answer: the number's own tokens).
    "easycontext": Template("This is a very long story book: <book>", haystack.NEEDLE,
                            "</book>.\n Based on the content of the book, Question: What is the special magic "
                            "{key} number? Answer: The special magic {key} number is:", "{number}"),
}


# ---- haystack -------------------------------------------------------------------------------------------------

def read_haystack_dir(path: str) -> str:
    """The .txt files of ``path`` concatenated in name order; ValueError if there are none or all are empty."""
    text = "".join(text_files(path, "haystack directory"))
    if not text.strip():
        raise ValueError(f"the .txt files in haystack directory {path!r} are empty")
    return text


def add_haystack_args(parser, hides: str = "the needle hides") -> None:
    """The haystack flags of an eval script: ``--haystack`` (``haystack_tokens``' source) and ``--text-split``."""
    parser.add_argument("--haystack", default=GENERATED,
                        help=f"the text {hides} in: generated (built-in filler sentences), pydoc (the Python "
                             "standard library's documentation, real English that every Python carries) or a folder "
                             "of .txt files read in name order")
    parser.add_argument("--text-split", choices=real_text.SPLITS, default="heldout",
                        help="pydoc haystack: which documents (a model trained on the train part is measured on "
                             "heldout)")


def haystack_tokens(tokenizer, num_tokens: int, source: str | None = None, *,
                    split: str = "heldout") -> tuple[list[int], str]:
    """(ids, description): ``num_tokens`` haystack token ids, the text tokenized once and repeated as needed.
    ``source``: None or "generated": generated filler sentences (``haystack.filler_sentence``, the default model's
    filler); "pydoc": the ``split`` documents of ``real_text``'s standard-library docs; anything else: a directory
    of .txt files, concatenated in name order (a folder named pydoc: ./pydoc)."""
    if source == real_text.PYDOC:
        text, what = real_text.corpus(source, split)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif source not in (None, GENERATED):
        text = read_haystack_dir(source)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        what = f"{os.path.basename(os.path.normpath(source))} (sha256 {digest})"
    else:
        rng, ids = random.Random(FILLER_SEED), []
        while len(ids) < num_tokens:  # sentence by sentence, so a longer haystack extends a shorter one
            batch = tokenizer([haystack.filler_sentence(rng) for _ in range(256)], add_special_tokens=False)
            for piece in batch["input_ids"]:
                ids.extend(piece)
        what = f"builtin filler (seed {FILLER_SEED})"
    if not ids:
        raise ValueError("the haystack tokenizes to nothing")
    reps = -(-num_tokens // len(ids))
    return (ids * reps)[:num_tokens], what


def sentence_end_ids(tokenizer, ids) -> set[int]:
    """The token ids among ``ids`` whose decoded text ends a sentence (ends with . ! or ?)."""
    return {i for i in set(ids) if tokenizer.decode([i]).rstrip().endswith(SENTENCE_ENDS)}


def insertion_point(hay: list[int], depth: float, ends: set[int]) -> int:
    """Where the needle goes in ``hay``: ``depth`` % of its length, moved to just after the next
    sentence-ending token (EasyContext's rule; none after it: the exact place). Depth 0: the start."""
    at = int(len(hay) * depth / 100)
    if at == 0:
        return 0
    for i in range(at, len(hay)):
        if hay[i] in ends:
            return i + 1
    return at


def depth_sweep(depths: list[float] | None = None, step: float = 10.0) -> list[float]:
    """Sorted distinct needle depths in percent: the list, else 0..100 every ``step``; ValueError outside 0-100
    or for a step that gives more than ``MAX_DEPTHS`` depths."""
    if depths is None:
        if not 0 < step <= 100:
            raise ValueError(f"depth step must be in (0, 100] percent; got {step}")
        if 100 / step + 1 > MAX_DEPTHS + 1e-6:
            raise ValueError(f"--depth-step {step} gives more than {MAX_DEPTHS} depths: use at least "
                             f"{100 / (MAX_DEPTHS - 1):g} percent (or list them with --depths)")
        depths = [round(i * step, 6) for i in range(int(100 / step + 1e-9) + 1)]
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"needle depth {bad[0]} is outside 0-100: depths are percentages of the haystack")
    return sorted(set(float(d) for d in depths))


# ---- prompts --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeedlePrompt:
    """One scored sequence: ``ids`` (prompt then answer), the answer's first index, the needle's first index."""

    ids: list[int]
    answer_start: int
    needle_at: int

    @property
    def answer_ids(self) -> list[int]:
        return self.ids[self.answer_start:]


class NeedleTask:
    """The prompts of one sweep: tokenizer, haystack ids, template and key; numbers drawn per sample from seed."""

    def __init__(self, tokenizer, haystack_ids: list[int], *, template: str = "default",
                 key: str = "Singapore", digits: int = 7, seed: int = 0):
        if template not in TEMPLATES:
            raise ValueError(f"unknown needle template {template!r}: use one of {', '.join(TEMPLATES)}")
        if digits < 1:
            raise ValueError(f"the needle number needs at least 1 digit; got {digits}")
        self.tokenizer, self.haystack, self.template = tokenizer, haystack_ids, TEMPLATES[template]
        self.key, self.digits, self.seed = key, digits, seed
        self.ends = sentence_end_ids(tokenizer, haystack_ids)

    def number(self, sample: int) -> str:
        """The needle's number in sample ``sample`` (the same in every cell, as in EasyContext)."""
        return haystack.random_number(random.Random(self.seed * 1_000_003 + sample), self.digits)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt(self, length: int, depth: float, number: str, offset: int = 0) -> NeedlePrompt:
        """The ``length``-token sequence of a cell (module doc). Its haystack part starts ``offset`` tokens into the
        haystack, modulo the starts that leave room for it (0: EasyContext's, the same text in every cell; others
        vary it, for training rows)."""
        t = self.template
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        head = bos + self._encode(t.prefix)
        needle = self._encode(t.needle.format(key=self.key, number=number))
        question = self._encode(t.question.format(key=self.key))
        answer = self._encode(t.answer.format(number=number))
        room = length - len(head) - len(needle) - len(question) - len(answer)
        if room < 0:
            raise ValueError(f"length {length} is too short for a needle prompt: the prompt's fixed parts take "
                             f"{length - room} tokens")
        if room > len(self.haystack):
            raise ValueError(f"the haystack has {len(self.haystack)} tokens, {room} are needed")
        start = offset % (len(self.haystack) - room + 1)
        hay = self.haystack[start:start + room]
        at = insertion_point(hay, depth, self.ends)
        ids = head + hay[:at] + needle + hay[at:] + question + answer
        return NeedlePrompt(ids, len(ids) - len(answer), len(head) + at)

    def check(self, lengths: list[int], samples: int) -> None:
        """Raise before any forward pass if a length cannot hold a prompt of some sample."""
        for s in range(samples):
            self.prompt(min(lengths), 0.0, self.number(s))


# ---- scoring --------------------------------------------------------------------------------------------------

@torch.no_grad()
def answer_predictions(model, ids: list[int] | Tensor, answer_start: int, answer_len: int) -> list[int]:
    """Collective over the model's SP group: the argmax token at each of the ``answer_len`` positions that
    predict ids[answer_start:answer_start + answer_len] (teacher-forced), on every rank. One forward pass of
    the decoder body on this rank's shard; logits (float32) only at the local answer positions."""
    if answer_start < 1 or answer_len < 1 or answer_start + answer_len > len(ids):
        raise ValueError(f"the answer must be non-empty, inside the sequence and after at least one prompt token; "
                         f"got start {answer_start}, length {answer_len} in {len(ids)} tokens")
    inputs = sp_shard(model, torch.as_tensor(ids, dtype=torch.long))
    hidden = model.base_model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                              use_cache=False).last_hidden_state[0]
    rel = inputs.position_ids[0] - (answer_start - 1)  # position p predicts token p + 1
    mine = (rel >= 0) & (rel < answer_len)
    pred = torch.full((answer_len,), -1, dtype=torch.long, device=hidden.device)
    if bool(mine.any()):
        pred[rel[mine]] = head_logits(model, hidden[mine]).argmax(dim=-1)
    reg = registered_backend(model)
    if reg is not None and group_rank_size(reg.group)[1] > 1:
        dist.all_reduce(pred, op=dist.ReduceOp.MAX, group=sp_process_group(reg.group))
    return pred.tolist()


def head_logits(model, h: Tensor) -> Tensor:
    """Float32 logits [N, vocab] of hidden states ``h`` [N, hidden] through the model's output head."""
    # float32 logits in vocabulary chunks: bf16 logits tie too often for an exact-match argmax, and a
    # float32 copy of the whole head would be large. Soft-capping and logit scales keep the argmax.
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    h = h.float()
    parts = []
    for a in range(0, w.shape[0], _VOCAB_CHUNK):
        z = h @ w[a:a + _VOCAB_CHUNK].float().t()
        parts.append(z if b is None else z + b[a:a + _VOCAB_CHUNK].float())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def generate_answer(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` on this process alone (full sequence, KV cache, no sequence
    parallelism: the model must not be patched)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=pad, temperature=None, top_p=None,
                         top_k=None)
    return out[0, len(prompt_ids):].tolist()


def first_number(text: str) -> str | None:
    """The first run of digits in ``text``, None if there is none."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def digits_right(number: str, predicted: str) -> float:
    """The fraction of ``number``'s digits that the first number in ``predicted`` has right, place by place
    (0.0 when it has none): partial credit where exact match is all or nothing."""
    got = first_number(predicted) or ""
    return sum(a == b for a, b in zip(number, got)) / len(number)


def score(model, task: NeedleTask, length: int, depth: float, sample: int, scoring: str = "forward") -> dict:
    """Collective for "forward": one cell sample's record {length, depth, sample, number, predicted, correct,
    needle_at}; ``predicted`` is the decoded argmax (forward) or generated text (generate)."""
    number = task.number(sample)
    p = task.prompt(length, depth, number)
    if scoring == "forward":
        pred = answer_predictions(model, p.ids, p.answer_start, len(p.answer_ids))
        predicted, correct = task.tokenizer.decode(pred), pred == p.answer_ids
    elif scoring == "generate":
        new = generate_answer(model, p.ids[:p.answer_start], len(p.answer_ids) + 8)
        predicted = task.tokenizer.decode(new, skip_special_tokens=True)
        correct = first_number(predicted) == number
    else:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    return dict(length=length, depth=depth, sample=sample, number=number, predicted=predicted,
                correct=bool(correct), needle_at=p.needle_at)


# ---- results --------------------------------------------------------------------------------------------------

def _cell(length, depth, sample) -> tuple[int, float, int]:
    return int(length), round(float(depth), 6), int(sample)


class NeedleResults(ResultsFile):
    """A sweep's results file: its settings and one record per (length, depth, sample). Reopening it with the
    same settings resumes (``has``); different settings raise instead of mixing two experiments."""

    def __init__(self, path: str, settings: dict):
        super().__init__(path, settings, key="cells",
                         remedy="give another output path, or delete the file to start over")
        self._done = {_cell(r["length"], r["depth"], r["sample"]) for r in self.records}

    def has(self, length: int, depth: float, sample: int) -> bool:
        return _cell(length, depth, sample) in self._done

    def add(self, record: dict) -> None:
        """Append a record and rewrite the file atomically (temp file, then os.replace)."""
        self.records.append(record)
        self._done.add(_cell(record["length"], record["depth"], record["sample"]))
        self.save()

    def accuracy(self) -> float:
        """The mean of ``correct`` over all records (NaN when there are none)."""
        return sum(r["correct"] for r in self.records) / len(self.records) if self.records else float("nan")

    def digit_accuracy(self) -> float:
        """The mean of ``digits_right`` over all records (NaN when there are none)."""
        scores = [digits_right(r["number"], r["predicted"]) for r in self.records]
        return sum(scores) / len(scores) if scores else float("nan")

    def write_csv(self, path: str) -> str:
        """Every record as a CSV row, sorted by length, depth, sample; returns ``path``."""
        rows = sorted(self.records, key=lambda r: _cell(r["length"], r["depth"], r["sample"]))
        return write_csv(path, rows, ["length", "depth", "sample", "number", "predicted", "correct", "needle_at"])
