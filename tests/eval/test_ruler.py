"""The suite sweep: which samples it scores, a sample's record (a model that knows the answer scores 1, a random
one 0 in one cached pass, partial answers get RULER's recall), the results file that resumes and refuses other
settings, the task x length summary with RULER's average and effective length, and the comparison of runs."""

from __future__ import annotations

import json
import os

import pytest

from easy_context.eval.needle import haystack_tokens
from easy_context.eval.ruler import (SuiteResults, comparison, run_name, score_sample, summary, sweep,
                                     write_comparison, write_summary, write_task_heatmaps)
from easy_context.eval.tasks import build_tasks
from easy_context.world.default import build_tokenizer
from tests.helpers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_sweep_gives_depthless_tasks_as_many_samples(tok):
    hay, _ = haystack_tokens(tok, 2048)
    tasks = build_tasks(["vt", "fwe"], tok, hay)
    cells = sweep(tasks, [512, 1024], [0.0, 50.0, 100.0], 2)
    vt = [c for c in cells if c[0] == "vt"]
    fwe = [c for c in cells if c[0] == "fwe"]
    assert len(vt) == len(fwe) == 2 * 3 * 2 and {c[2] for c in fwe} == {None}
    assert sorted({c[3] for c in fwe}) == list(range(6)) and ("vt", 1024, 50.0, 1) in vt


def test_a_record_scores_what_the_model_says(tok, monkeypatch):
    from easy_context.eval import ruler

    hay, _ = haystack_tokens(tok, 1024)
    (task,) = build_tasks(["multivalue"], tok, hay)
    s = task.sample(600, 50.0, 0)
    said = {}

    def decoder(model, prompt, draft, scoring):  # the model says said["text"]; decoding is test_decode's
        assert prompt == s.ids[:s.answer_start] and draft == s.answer_ids
        return tok(said["text"], add_special_tokens=False)["input_ids"], 3 if scoring == "greedy" else 1

    monkeypatch.setattr(ruler, "decode_answer", decoder)
    said["text"] = " " + ", ".join(s.references[:2]) + ", 1111111, 2222222."
    for scoring, passes in (("greedy", 3), ("forward", 1)):
        r = score_sample(None, task, 600, 50.0, 0, scoring)
        assert r["score"] == 0.5 and not r["exact"] and r["passes"] == passes  # RULER's recall: 2 of 4 values
        assert r["predicted"] == said["text"] and r["references"] == list(s.references)
        assert r["evidence_at"] == s.evidence_at and (r["task"], r["length"], r["depth"]) == ("multivalue", 600, 50)
    said["text"] = tok.decode(s.answer_ids)
    r = score_sample(None, task, 600, 50.0, 0)
    assert r["score"] == 1.0 and r["exact"]


def test_a_random_model_scores_nothing_in_one_cached_pass(tok):
    hay, _ = haystack_tokens(tok, 1024)
    (task,) = build_tasks(["multikey"], tok, hay)
    r = score_sample(tiny_model("llama", 0, vocab_size=len(tok)), task, 400, 50.0, 0)
    assert r["score"] == 0.0 and r["passes"] == 1  # the model's own attention: a prefill, then the KV cache
    with pytest.raises(ValueError, match="unknown scoring"):
        score_sample(None, task, 400, 50.0, 0, "sampled")


def _records():
    rows = []
    for task, scores in (("needle", {1024: [1, 1], 2048: [1, 0]}), ("cwe", {1024: [0.8, 1.0], 2048: [0.1, 0.3]})):
        for n, values in scores.items():
            rows += [dict(task=task, length=n, depth=None if task == "cwe" else 50.0, sample=i, score=v,
                          exact=v == 1, references=["x"], predicted="x", evidence_at=None, passes=1)
                     for i, v in enumerate(values)]
    return rows


def test_summary_averages_tasks_and_finds_the_effective_length():
    table = summary(_records(), order=["needle", "vt", "cwe"])
    assert table["tasks"] == ["needle", "cwe"] and table["lengths"] == [1024, 2048]
    assert table["scores"]["needle"] == {"1024": 100.0, "2048": 50.0}
    assert table["scores"]["cwe"]["1024"] == pytest.approx(90.0)
    assert table["average"]["1024"] == pytest.approx(95.0) and table["average"]["2048"] == pytest.approx(35.0)
    assert table["effective_length"] == 1024 and table["samples"]["cwe"]["2048"] == 2
    assert summary(_records(), threshold=99.0)["effective_length"] is None


def test_summary_and_comparison_files(tmp_path):
    from PIL import Image

    table = summary(_records())
    csv_path, json_path, png = write_summary(str(tmp_path / "s"), table, "t")
    lines = open(csv_path).read().splitlines()
    assert lines[0].startswith("# ") and "effective length (average > 85.6): 1024" in lines[0]
    assert lines[1] == "task,1024,2048,mean" and lines[2] == "needle,100.00,50.00,75.00"
    assert lines[-1].startswith("average,95.00,35.00,65.00")
    assert json.load(open(json_path)) == json.loads(json.dumps(table))
    Image.open(png).verify()
    paths = write_task_heatmaps(str(tmp_path / "s"), _records(), "m", ["cwe", "needle"])
    assert [os.path.basename(p) for p in paths] == ["s_cwe.png", "s_needle.png"]
    other = summary([dict(r, score=0.0) for r in _records()])
    cmp = comparison({"a": table, "b": other})
    assert cmp["scores"]["a"] == table["average"] and cmp["scores"]["b"] == {"1024": 0.0, "2048": 0.0}
    assert cmp["effective_length"] == {"a": 1024, "b": None} and cmp["by_task"]["a"]["needle"] == 75.0
    only_cwe = comparison({"a": table}, tasks=["cwe"])
    assert only_cwe["scores"]["a"]["1024"] == pytest.approx(90.0)
    written = write_comparison(str(tmp_path / "c"), cmp, "t")
    assert open(written[0]).read().splitlines()[2] == "a,95.00,35.00,65.00,1024"
    assert open(written[1]).read().splitlines()[1:] == ["run,needle,cwe", "a,75.00,55.00", "b,0.00,0.00"]
    assert run_name(dict(model="out/x/model", rope_theta=1e6, rope_scaling=None)) == "x/model theta=1e+06"
    assert run_name(dict(model="org/m", rope_scaling="yarn:factor=4")) == "m yarn:factor=4"


def test_results_resume_and_refuse_other_settings(tmp_path):
    path = str(tmp_path / "r.json")
    settings = dict(model="m", tasks={"needle": {"seed": 0}})
    results = SuiteResults(path, settings)
    for r in _records()[:3]:
        results.add(r)
    again = SuiteResults(path, dict(settings))
    assert again.has("needle", 1024, 50, 0) and again.has("needle", 2048, 50.0, 0)
    assert not again.has("needle", 2048, 50.0, 1) and not again.has("cwe", 1024, None, 0)
    with pytest.raises(ValueError, match="different settings"):
        SuiteResults(path, dict(settings, model="n"))
    lines = open(again.write_csv(str(tmp_path / "r.csv"))).read().splitlines()
    assert lines[0] == "task,length,depth,sample,score,exact,references,predicted,evidence_at,passes"
    assert len(lines) == 4
