"""eval_ruler.py end to end as subprocesses on a tiny world: one process and two (torchrun, gloo) score the same,
a rerun scores only what is missing (a new task included), every file it promises is written, --compare puts runs
side by side, and bad input exits clearly before any model loads."""

from __future__ import annotations

import json

from tests.eval.test_eval_scripts import _is_png, _run, world  # noqa: F401  (the module's world fixture)


def _records(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    return {(r["task"], r["length"], r["depth"], r["sample"]): r for r in data["records"]}


def test_one_and_two_processes_score_the_same_and_reruns_resume(world):  # noqa: F811
    one, two = world / "ruler1" / "r.json", world / "ruler2" / "r.json"
    args = ["eval_ruler.py", "--model", str(world / "world"), "--lengths", "600", "--depths", "50",
            "--samples", "1", "--haystack", "pydoc", "--scoring", "forward"]
    out = _run([*args, "--tasks", "needle", "multikey", "fwe", "--output", str(one)])
    assert "3 of 3 samples to score (3 tasks" in out.stdout and "effective length" in out.stdout
    full = _records(one)
    assert {k[0] for k in full} == {"needle", "multikey", "fwe"} and full[("fwe", 600, None, 0)]["passes"] == 1
    for name in ("r.csv", "r_needle.png", "r_multikey.png", "r_fwe.png", "r_summary.csv", "r_summary.json",
                 "r_summary.png"):
        assert (world / "ruler1" / name).exists(), name
    _is_png(world / "ruler1" / "r_summary.png")
    data = json.loads(one.read_text())  # keep one task's record: the other two, and a new task, are left to do
    data["records"] = [r for r in data["records"] if r["task"] == "needle"]
    two.parent.mkdir()
    two.write_text(json.dumps(data))
    out = _run([*args, "--tasks", "needle", "multikey", "fwe", "vt", "--output", str(two)], procs=2)
    assert "3 of 4 samples to score (4 tasks, 2 process(es)" in out.stdout
    resumed = _records(two)
    assert {k: v for k, v in resumed.items() if k[0] != "vt"} == full  # 2 processes scored as 1 did
    eval_ruler = _script()
    eval_ruler.compare([str(one), str(two)], ["needle", "multikey", "fwe", "vt"], str(world / "cmp"))
    assert (world / "cmp.png").exists() and (world / "cmp_tasks.csv").exists()
    rows = (world / "cmp.csv").read_text().splitlines()
    assert rows[1].startswith("run,600") and len(rows) == 4  # the same model twice, told apart by file


def _script():
    import importlib
    import sys

    from tests.helpers.launch import REPO

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module("eval_ruler")


def test_bad_input_exits_before_the_model_loads(world, capsys):  # noqa: F811
    import pytest

    out = _run(["eval_ruler.py", "--model", str(world / "world"), "--lengths", "200", "--tasks", "cwe",
                "--output", str(world / "bad" / "r.json")], ok=False)
    assert out.returncode != 0 and "too short for a cwe prompt" in out.stderr and "Loading weights" not in out.stderr
    assert not (world / "bad").exists()
    eval_ruler = _script()
    with pytest.raises(SystemExit) as e:
        eval_ruler.parse_args(["--lengths", "200"])
    assert e.value.code == 2 and "give --model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        eval_ruler.compare([str(world / "missing.json")], ["needle"], str(world / "cmp_missing"))
