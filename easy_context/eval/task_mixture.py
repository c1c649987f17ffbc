"""Training rows that teach the task suite: each row one task sample (``tasks.py``) at a random depth over a random
stretch of the haystack, or a plain window of that text; labelled for a loss on the answers (and on a share of
the other tokens, so the model also learns the text), and written as a dataset folder that train.py reads.

Build the tasks with another seed than the evaluation's (``TRAIN_SEED``): the needle task draws its number from
(seed, sample) alone, so equal seeds would train on the evaluation's answers.
"""

from __future__ import annotations

import os
import random
import shutil

import torch

from ..hf.models import load_tokenizer
from ..world import real_text
from .needle import GENERATED, haystack_tokens, read_haystack_dir
from .tasks import TASKS, Task, build_tasks

TRAIN_SEED = 1_000_003  # the evaluation's default seed is 0
GENERATED_TOKENS = 1 << 20  # a generated training haystack: this many tokens of filler (it repeats past them)


def corpus_tokens(tokenizer, source: str = GENERATED, split: str = "train") -> tuple[list[int], str]:
    """(ids, description): all of a text source as one token stream, for training rows: "generated" (filler,
    ``GENERATED_TOKENS`` of it), "pydoc" (the ``split`` documents of ``real_text``) or a folder of .txt files."""
    if source == GENERATED:
        return haystack_tokens(tokenizer, GENERATED_TOKENS, GENERATED)
    if source == real_text.PYDOC:
        text, what = real_text.corpus(source, split)
    else:
        text, what = read_haystack_dir(source), source
    return tokenizer(text, add_special_tokens=False)["input_ids"], what


def tasks_that_fit(tasks: list[Task], length: int) -> tuple[list[Task], dict[str, str]]:
    """(the tasks whose prompt fits in ``length`` tokens, {name: why not} of the others), probing one sample each."""
    fit, skipped = [], {}
    for task in tasks:
        try:
            task.sample(length, 50.0 if task.has_depth else None, 0)
            fit.append(task)
        except ValueError as e:
            skipped[task.name] = str(e)
    return fit, skipped


class TaskMixture(torch.utils.data.Dataset):
    """``size`` rows {"input_ids", "labels"} (LongTensors [length]); row i from seed (seed, i), made on access.
    A row is a plain text window (BOS + ``text`` tokens from a random offset, every token labelled) with
    probability ``text_share``, else a sample of a task drawn by ``weights`` (default: uniform), at a uniform
    random depth over a shifted haystack, whose answer tokens and a random ``text_fraction`` of the others are
    labelled; -100 elsewhere (BOS always)."""

    def __init__(self, tasks: list[Task], text: list[int], length: int, *, size: int = 100_000, seed: int = 0,
                 weights: dict[str, float] | None = None, text_share: float = 0.2, text_fraction: float = 0.05):
        if not tasks and text_share < 1:
            raise ValueError("a task mixture needs tasks, or text_share 1 (text rows only)")
        if not 0 <= text_share <= 1 or not 0 <= text_fraction <= 1:
            raise ValueError(f"text_share and text_fraction are shares in [0, 1]; got {text_share}, {text_fraction}")
        if len(text) < length - 1:
            raise ValueError(f"the text holds {len(text)} tokens; a {length}-token row needs {length - 1}")
        unknown = set(weights or {}) - {t.name for t in tasks}
        if unknown:
            raise ValueError(f"weights name tasks not in the mixture: {sorted(unknown)}")
        self.tasks, self.text, self.length, self.size, self.seed = tasks, text, length, size, seed
        self.weights = [float((weights or {}).get(t.name, 1.0 if weights is None else 0.0)) for t in tasks]
        self.text_share, self.text_fraction = text_share, text_fraction
        self.bos = [] if not tasks or tasks[0].tokenizer.bos_token_id is None else [tasks[0].tokenizer.bos_token_id]

    def __len__(self) -> int:
        return self.size

    def row(self, i: int) -> tuple[list[int], list[int], str, int | None]:
        """(input_ids, labels, kind, answer start) of row ``i``; kind: "text" (answer start None) or the task's
        name."""
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = random.Random(f"{self.seed}/{i}")
        if rng.random() < self.text_share:
            start = rng.randrange(len(self.text) - (self.length - len(self.bos)) + 1)
            ids = self.bos + self.text[start:start + self.length - len(self.bos)]
            return ids, [-100] * len(self.bos) + ids[len(self.bos):], "text", None
        task = rng.choices(self.tasks, weights=self.weights)[0]
        s = task.sample(self.length, rng.uniform(0, 100) if task.has_depth else None, i, shift=True)
        labels = [t if k >= s.answer_start or (k >= len(self.bos) and rng.random() < self.text_fraction) else -100
                  for k, t in enumerate(s.ids)]
        return s.ids, labels, task.name, s.answer_start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, _, _ = self.row(i)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def save_task_mixture(path: str, mixture: TaskMixture, *, num_proc: int | None = None) -> str:
    """Write every row of ``mixture`` as a ``datasets`` folder (``save_to_disk``; columns input_ids and labels,
    int32) for ``train.py --dataset PATH``; ``num_proc`` processes make the rows. The folder appears whole or not
    at all (written beside it, then renamed); an existing ``path`` is refused. Returns ``path``."""
    from datasets import Dataset, Features, Sequence, Value

    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: training rows are never written over; choose another path or remove it")
    procs = max(1, num_proc or 1)
    bounds = [mixture.size * k // procs for k in range(procs + 1)]

    def rows(shards):
        for a, b in shards:
            for i in range(a, b):
                ids, labels, _, _ = mixture.row(i)
                yield {"input_ids": ids, "labels": labels}

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    shards = [(bounds[k], bounds[k + 1]) for k in range(procs)]
    ds = Dataset.from_generator(rows, features=features, gen_kwargs={"shards": shards},
                                num_proc=procs if procs > 1 else None)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        ds.save_to_disk(partial)
        os.rename(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def write_mixture(path: str, tokenizer, length: int, rows: int, *, tasks: list[str] | None = None,
                  source: str = real_text.PYDOC, split: str = "train", seed: int = TRAIN_SEED,
                  text_share: float = 0.2, text_fraction: float = 0.05, num_proc: int | None = None,
                  weights: dict[str, float] | None = None) -> str:
    """Write ``rows`` rows of a ``TaskMixture`` at ``length`` over the text ``source`` (``corpus_tokens``) to the
    dataset folder ``path`` (``save_task_mixture``), with the tasks of ``tasks`` (default: all) that fit the
    length (the others are named and left out), drawn by ``weights`` ({task: weight}, 1 for a task not named);
    ``tokenizer``: the model's, or a path to load it from. Prints what it wrote; returns ``path``."""
    names = tasks or list(TASKS)
    unknown = sorted(set(weights or {}) - set(names))
    if unknown:
        raise ValueError(f"weights name tasks that are not written: {unknown}; the tasks are {', '.join(names)}")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    text, what = corpus_tokens(tokenizer, source, split)
    fit, skipped = tasks_that_fit(build_tasks(names, tokenizer, text, seed=seed), length)
    for name, why in skipped.items():
        print(f"{name} left out at {length} tokens: {why}")
    mixture = TaskMixture(fit, text, length, size=rows, seed=seed, text_share=text_share if fit else 1.0,
                          text_fraction=text_fraction,
                          weights={t.name: (weights or {}).get(t.name, 1.0) for t in fit} if weights else None)
    save_task_mixture(path, mixture, num_proc=num_proc)
    print(f"wrote {rows} rows of {length} tokens to {path}: tasks {', '.join(t.name for t in fit) or 'none'}, "
          f"text rows {mixture.text_share:.0%}, text {what}")
    return path
