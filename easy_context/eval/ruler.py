"""A sweep of the RULER-style task suite (``tasks.py``): which samples it scores, one sample's record (generated
answer and RULER metric), the resumable results file, and the task x length summary with RULER's effective length.

A depth task is scored at every (length, depth, sample); a task without depth (cwe, fwe) at ``samples x depths``
samples per length, so every task has as many samples per length. A task's score at a length is the mean of its
samples' metric, times 100; the suite's score at a length is the mean over tasks (RULER's average). The effective
length is RULER's: the largest length whose suite score exceeds the threshold (85.6, Llama-2-7B's at 4K).
"""

from __future__ import annotations

import os
from collections import defaultdict

from .decode import SCORINGS, decode_answer
from .plots import summary_heatmap, task_heatmap
from .results import ResultsFile, write_csv, write_json
from .tasks import METRICS, Task

EFFECTIVE_THRESHOLD = 85.6
CSV_COLUMNS = ["task", "length", "depth", "sample", "score", "exact", "references", "predicted", "evidence_at",
               "passes"]


def sweep(tasks: list[Task], lengths: list[int], depths: list[float], samples: int) -> list[tuple]:
    """Every (task name, length, depth or None, sample) the sweep scores (module doc), task by task."""
    out = []
    for task in tasks:
        for length in lengths:
            if task.has_depth:
                out += [(task.name, length, float(d), s) for d in depths for s in range(samples)]
            else:
                out += [(task.name, length, None, s) for s in range(samples * len(depths))]
    return out


def score_sample(model, task: Task, length: int, depth: float | None, sample: int, scoring: str = "greedy") -> dict:
    """Collective over the model's SP group: the record of one sample {task, length, depth, sample, score,
    exact, references, predicted, evidence_at, passes}. The model decodes as many tokens as the reference answer
    has (``decode.decode_answer``: greedy or forward), and ``score`` is the task's RULER metric of the decoded
    text; ``exact``: whether those tokens are the reference's."""
    s = task.sample(length, depth, sample)
    tokens, passes = decode_answer(model, s.ids[:s.answer_start], s.answer_ids, scoring)
    predicted = task.tokenizer.decode(tokens, skip_special_tokens=True)
    return dict(task=task.name, length=length, depth=depth, sample=sample,
                score=METRICS[task.metric](predicted, s.references), exact=tokens == s.answer_ids,
                references=list(s.references), predicted=predicted, evidence_at=s.evidence_at, passes=passes)


def _key(task, length, depth, sample) -> tuple:
    return str(task), int(length), None if depth is None else round(float(depth), 6), int(sample)


class SuiteResults(ResultsFile):
    """A suite sweep's results file: its settings and one record per (task, length, depth, sample). Reopening it
    with the same settings resumes (``has``), with more tasks or lengths too; other settings raise instead of
    mixing two experiments."""

    def __init__(self, path: str, settings: dict):
        super().__init__(path, settings, key="records",
                         remedy="give another output path, or delete the file to start over")
        self._done = {_key(r["task"], r["length"], r["depth"], r["sample"]) for r in self.records}

    def has(self, task: str, length: int, depth: float | None, sample: int) -> bool:
        return _key(task, length, depth, sample) in self._done

    def add(self, record: dict) -> None:
        """Append a record and rewrite the file atomically."""
        self.records.append(record)
        self._done.add(_key(record["task"], record["length"], record["depth"], record["sample"]))
        self.save()

    def write_csv(self, path: str, order: list[str] | None = None) -> str:
        """Every record as a CSV row (references joined by "|"), by task (in ``order``), length, depth, sample."""
        rank = {t: i for i, t in enumerate(order or [])}
        rows = sorted(self.records, key=lambda r: (rank.get(r["task"], len(rank)), r["task"],
                                                   *_key(r["task"], r["length"], -1 if r["depth"] is None else
                                                         r["depth"], r["sample"])[1:]))
        return write_csv(path, [dict(r, references="|".join(r["references"])) for r in rows], CSV_COLUMNS)


def summary(records: list[dict], order: list[str] | None = None, threshold: float = EFFECTIVE_THRESHOLD) -> dict:
    """The task x length table of ``records``: {"tasks" (``order`` first, then any others), "lengths", "scores":
    {task: {str(length): mean score x 100}}, "samples": the same shape with counts, "average": {str(length): mean
    over the tasks scored there}, "tasks_averaged": {str(length): how many}, "threshold", "effective_length": the
    largest length whose average exceeds the threshold (None if none does)}."""
    values = defaultdict(list)
    for r in records:
        values[(r["task"], int(r["length"]))].append(float(r["score"]))
    present = list(dict.fromkeys(t for t, _ in values))
    tasks = [t for t in (order or []) if t in present] + [t for t in present if t not in (order or [])]
    lengths = sorted({n for _, n in values})
    scores = {t: {str(n): 100 * sum(v) / len(v) for (tt, n), v in values.items() if tt == t} for t in tasks}
    counts = {t: {str(n): len(v) for (tt, n), v in values.items() if tt == t} for t in tasks}
    average, averaged = {}, {}
    for n in lengths:
        here = [scores[t][str(n)] for t in tasks if str(n) in scores[t]]
        average[str(n)], averaged[str(n)] = sum(here) / len(here), len(here)
    passing = [n for n in lengths if average[str(n)] > threshold]
    return dict(tasks=tasks, lengths=lengths, scores=scores, samples=counts, average=average,
                tasks_averaged=averaged, threshold=threshold, effective_length=max(passing) if passing else None)


def write_summary(stem: str, table: dict, title: str) -> list[str]:
    """Write ``table`` (``summary``) as STEM.csv (a row per task and an average row, a column per length and the
    mean over lengths), STEM.json and STEM.png (``plots.summary_heatmap``); returns the three paths."""
    lengths = [str(n) for n in table["lengths"]]
    rows = []
    for name, scores in [*table["scores"].items(), ("average", table["average"])]:
        done = [scores[n] for n in lengths if n in scores]
        rows.append({"task": name, **{n: f"{scores[n]:.2f}" for n in lengths if n in scores},
                     "mean": f"{sum(done) / len(done):.2f}"})
    effective = table["effective_length"]
    header = (f"RULER-style suite score (%) per task and length; average = mean over tasks; effective length "
              f"(average > {table['threshold']}): {effective if effective is not None else 'none'}")
    csv_path = write_csv(stem + ".csv", rows, ["task", *lengths, "mean"], header=header)
    write_json(stem + ".json", table)
    png = summary_heatmap(table, stem + ".png", title)
    return [csv_path, stem + ".json", png]


def write_task_heatmaps(stem: str, records: list[dict], name: str, order: list[str]) -> list[str]:
    """One heatmap per task of ``records``, STEM_<task>.png, titled with ``name`` and the task's mean score."""
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    paths = []
    for task in [t for t in order if t in by_task] + [t for t in by_task if t not in order]:
        rs = by_task[task]
        mean = 100 * sum(r["score"] for r in rs) / len(rs)
        paths.append(task_heatmap(rs, f"{stem}_{task}.png", f"{name}: {task} {mean:.1f}%"))
    return paths


def output_stem(path: str) -> str:
    """The results JSON's path without its extension: where the CSV, summary and heatmaps go."""
    return os.path.splitext(path)[0]


def comparison(tables: dict[str, dict], tasks: list[str] | None = None) -> dict:
    """Several runs' summaries (``summary``, by run name) side by side, in ``summary``'s shape with the runs as
    rows: "scores": {run: {str(length): its suite average over ``tasks`` (default: each run's own tasks)}},
    no "average" row; plus "by_task": {run: {task: mean over its lengths}} and "effective_length": {run: ...}
    (of the averages shown, against each run's threshold)."""
    scores, by_task, effective = {}, {}, {}
    for run, table in tables.items():
        chosen = [t for t in table["tasks"] if tasks is None or t in tasks]
        row = {}
        for n in table["lengths"]:
            here = [table["scores"][t][str(n)] for t in chosen if str(n) in table["scores"][t]]
            if here:
                row[str(n)] = sum(here) / len(here)
        scores[run] = row
        by_task[run] = {t: sum(table["scores"][t].values()) / len(table["scores"][t]) for t in chosen}
        passing = [int(n) for n, v in row.items() if v > table["threshold"]]
        effective[run] = max(passing) if passing else None
    lengths = sorted({int(n) for row in scores.values() for n in row})
    return dict(tasks=list(tables), lengths=lengths, scores=scores, average={}, by_task=by_task,
                effective_length=effective)


def write_comparison(stem: str, table: dict, title: str) -> list[str]:
    """Write a ``comparison`` as STEM.csv (a row per run: its average per length, its mean, its effective length),
    STEM_tasks.csv (a row per run: its mean per task), STEM.json and STEM.png; returns the paths."""
    lengths = [str(n) for n in table["lengths"]]
    rows = []
    for run, scores in table["scores"].items():
        done = list(scores.values())
        rows.append({"run": run, **{n: f"{scores[n]:.2f}" for n in lengths if n in scores},
                     "mean": f"{sum(done) / len(done):.2f}" if done else "",
                     "effective_length": table["effective_length"][run] or ""})
    header = "RULER-style suite average (%) per run and length: the mean over the tasks of each run"
    csv_path = write_csv(stem + ".csv", rows, ["run", *lengths, "mean", "effective_length"], header=header)
    tasks = list(dict.fromkeys(t for row in table["by_task"].values() for t in row))
    task_rows = [{"run": run, **{t: f"{v:.2f}" for t, v in row.items()}} for run, row in table["by_task"].items()]
    tasks_csv = write_csv(stem + "_tasks.csv", task_rows, ["run", *tasks],
                          header="RULER-style task score (%) per run: the mean over the run's lengths")
    write_json(stem + ".json", table)
    png = summary_heatmap(table, stem + ".png", title, ylabel="Run")
    return [csv_path, tasks_csv, stem + ".json", png]


def run_name(settings: dict) -> str:
    """A results file's run as a short label: the model (train.py's OUT/model as "OUT/model", else the last part of
    its path) and any RoPE override."""
    parts = os.path.normpath(settings["model"]).split(os.sep)
    name = "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]
    if settings.get("rope_theta") is not None:
        name += f" theta={settings['rope_theta']:g}"
    if settings.get("rope_scaling"):
        name += f" {settings['rope_scaling']}"
    return name
