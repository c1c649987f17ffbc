"""eval_needle.py and eval_ppl.py run end to end as processes on a tiny world (build_default_world) with 1
process and with 2 (as torchrun starts them, gloo on CPU): they write their files, the PNGs open as images, the
2-process scores equal the 1-process ones, a rerun scores only the missing cells, and a bad length exits clearly."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pytest

from tests.helpers.launch import launch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from easy_context.hf.models import load_tokenizer
    from easy_context.world.default import build_default_world, save_documents

    d = tmp_path_factory.mktemp("eval")
    build_default_world(str(d / "world"))
    shutil.copytree(d / "world", d / "world_b")  # a second model: same tokenizer, other random weights
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d / "world")).save_pretrained(d / "world_b")
    save_documents(str(d / "docs"), load_tokenizer(str(d / "world")), count=2, length=1024)
    return d


def _run(args: list[str], procs: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    """``args`` (a script, then its flags) on ``procs`` processes as torchrun starts them (one: plain)."""
    out = launch(args[0], *args[1:], procs=procs, extra_env={"HF_HUB_OFFLINE": "1"})
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _is_png(path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def _cells(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    return {(c["length"], c["depth"], c["sample"]): c for c in data["cells"]}


def test_eval_needle_1_and_2_processes_and_resume(world):
    one, two = world / "needle1" / "r.json", world / "needle2" / "r.json"
    args = ["eval_needle.py", "--model", str(world / "world"), "--lengths", "256", "512",
            "--depths", "0", "50", "100", "--samples", "2"]
    out = _run([*args, "--output", str(one)])
    assert "12 of 12 samples to score" in out.stdout and "accuracy" in out.stdout
    full = _cells(one)
    assert len(full) == 12 and all(c["number"].isdigit() and len(c["number"]) == 7 for c in full.values())
    _is_png(world / "needle1" / "r.png")
    _is_png(world / "needle1" / "r_digits.png")
    with open(world / "needle1" / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    # Resume: keep only the 256-token cells, then let 2 processes score the rest sequence-parallel.
    with open(one) as f:
        data = json.load(f)
    data["cells"] = [c for c in data["cells"] if c["length"] == 256]
    two.parent.mkdir()
    two.write_text(json.dumps(data))
    out = _run([*args, "--output", str(two)], procs=2)
    assert "6 of 12 samples to score (2 process(es)" in out.stdout
    assert _cells(two) == full  # the 512-token cells, scored on 2 processes, equal the 1-process ones
    _is_png(world / "needle2" / "r.png")


def test_eval_needle_runs_a_random_shape_model_with_the_built_in_tokenizer(world):
    # What a fit test at 1M tokens runs on GPUs (no weights to download): a named shape, random init.
    out_json = world / "needle_shape" / "r.json"
    shape = ("shape:llama3-8b,num_hidden_layers=1,hidden_size=128,intermediate_size=256,num_attention_heads=4,"
             "num_key_value_heads=2")
    out = _run(["eval_needle.py", "--model", shape, "--tokenizer", "tiny", "--lengths", "512", "--depths", "50",
                "--samples", "1", "--output", str(out_json)], procs=2)
    assert "1 of 1 samples to score (2 process(es)" in out.stdout
    (cell,) = _cells(out_json).values()
    assert cell["length"] == 512 and len(cell["number"]) == 7


def test_eval_needle_refuses_lengths_above_the_position_limit(world):
    out = _run(["eval_needle.py", "--model", str(world / "world"), "--lengths", "4096",
                "--output", str(world / "bad" / "r.json")], ok=False)
    assert out.returncode != 0 and "position limit of 2048" in out.stderr and "--allow-extrapolation" in out.stderr
    assert not (world / "bad").exists()


def test_eval_ppl_1_and_2_processes(world):
    args = ["eval_ppl.py", "-m", str(world / "world"), "-m", str(world / "world_b"), "--dataset",
            str(world / "docs"), "--lengths", "256", "512", "1024"]
    rows = {}
    for procs in (1, 2):
        path = world / f"ppl{procs}" / "ppl.csv"
        out = _run([*args, "--output", str(path)], procs=procs)
        assert "2 documents, 0 skipped" in out.stdout
        with open(path) as f:
            assert f.readline().startswith("# protocol=truncate")
            rows[procs] = list(csv.DictReader(f))
        _is_png(path.with_suffix(".png"))
    assert [(r["model"], r["length"]) for r in rows[1]] == [
        (str(world / m), n) for m in ("world", "world_b") for n in ("256", "512", "1024")]
    for a, b in zip(rows[1], rows[2]):
        assert a["tokens"] == b["tokens"] and float(a["perplexity"]) == pytest.approx(float(b["perplexity"]), rel=1e-5)


@pytest.mark.parametrize("script, args, message", [
    ("eval_needle.py", ["--min-length", "0", "--max-length", "512"], "--min-length: must be at least 2"),
    ("eval_needle.py", ["--lengths", "256", "--samples", "0"], "--samples: must be at least 1"),
    ("eval_needle.py", ["--lengths", "256", "--length-step", "-8"], "--length-step: must be at least 1"),
    ("eval_ppl.py", ["--min-length", "-4", "--max-length", "512"], "--min-length: must be at least 2"),
    ("eval_ppl.py", ["--lengths", "256", "--samples", "0"], "--samples: must be at least 1"),
    ("eval_ppl.py", ["--lengths", "256", "--ulysses-degree", "0"], "--ulysses-degree: must be at least 1"),
])
def test_nonsense_lengths_and_counts_are_refused_at_once(world, script, args, message):
    out = world / "nonsense" / "r.json"
    model = ["--model", str(world / "world")]
    if script == "eval_ppl.py":
        model += ["--dataset", str(world / "docs")]
    res = _run([script, *model, *args, "--output", str(out)], ok=False)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-3000:]
    assert not (world / "nonsense").exists()


def test_eval_ppl_reruns_resume_keep_other_models_and_refuse_other_settings(world):
    path = world / "ppl_resume" / "ppl.csv"
    args = ["eval_ppl.py", "--dataset", str(world / "docs"), "--lengths", "256", "512", "--output", str(path)]
    _run([*args, "-m", str(world / "world")])
    with open(path) as f:
        f.readline()
        first = {r["length"]: r for r in csv.DictReader(f)}
    store = path.with_suffix(".json")
    data = json.loads(store.read_text())  # a kill after the first length: only its row was saved
    data["rows"] = [r for r in data["rows"] if r["length"] == 256]
    store.write_text(json.dumps(data))
    out = _run([*args, "-m", str(world / "world"), "-m", str(world / "world_b")])
    assert f"{world / 'world'}: 1 of 2 lengths to evaluate" in out.stdout
    assert f"{world / 'world_b'}: 2 of 2 lengths to evaluate" in out.stdout
    with open(path) as f:
        f.readline()
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["length"]) for r in rows] == [
        (str(world / m), n) for m in ("world", "world_b") for n in ("256", "512")]
    assert rows[1]["perplexity"] == first["512"]["perplexity"]  # the resumed length equals the uninterrupted one
    out = _run([*args, "-m", str(world / "world_b")])  # another model's rerun keeps the others' results
    assert f"{world / 'world_b'}: 0 of 2 lengths to evaluate" in out.stdout and "Loading weights" not in out.stderr
    before = path.read_text()
    out = _run([*args, "-m", str(world / "world"), "--samples", "1"], ok=False)
    assert out.returncode != 0 and "different settings (samples: None there, 1 now)" in out.stderr
    assert path.read_text() == before


def test_eval_ppl_on_real_text_cuts_the_held_out_docs_into_documents(world):
    path = world / "ppl_real" / "ppl.csv"
    out = _run(["eval_ppl.py", "-m", str(world / "world"), "--real-text", "pydoc", "--lengths", "256", "512",
                "--samples", "3", "--output", str(path)])
    assert "3 documents, 0 skipped" in out.stdout
    header = path.read_text().splitlines()[0]
    assert "documents: pydoc (Python" in header and "heldout" in header and "sha256" in header
    with open(path) as f:
        f.readline()
        rows = list(csv.DictReader(f))
    assert [r["length"] for r in rows] == ["256", "512"] and rows[0]["tokens"] == str(3 * 255)
