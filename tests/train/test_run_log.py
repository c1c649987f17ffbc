"""run_log.py: a resumed run's log is cut back to its checkpoint; records are appended one JSON line each."""

from __future__ import annotations

import json

import pytest

from easy_context.train import run_log


def test_trim_log_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    run_log.trim_log(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    run_log.trim_log(str(tmp_path / "missing.jsonl"), 4)  # nothing to trim: no error


def test_trim_log_drops_a_partial_last_line_left_by_a_kill(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    run_log.trim_log(str(path), 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 4)) + json.dumps({"step": 4}))
    run_log.trim_log(str(path), 10)  # complete but for its newline: kept, and the next record starts a line
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 4
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage inside the log is not a kill: say where
    with pytest.raises(ValueError, match="line 2"):
        run_log.trim_log(str(path), 10)


def test_run_log_appends_one_record_per_line_on_the_main_process_only(tmp_path):
    path = run_log.log_path(str(tmp_path / "run"))
    log = run_log.RunLog(path, main=True)
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 2, "loss": 2.0})
    run_log.RunLog(path, main=False).write({"step": 3, "loss": 1.0})
    assert [json.loads(line) for line in open(path)] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    run_log.RunLog(path, main=True, resume_step=1)  # a resume from step 1's checkpoint
    assert [json.loads(line)["step"] for line in open(path)] == [1]
