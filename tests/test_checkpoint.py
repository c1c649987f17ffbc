"""checkpoint.py: only complete checkpoints are ever resumed from; logs are cut back to the checkpoint."""

from __future__ import annotations

import json
import os

from easy_context import checkpoint


def make(root, name, complete=True):
    os.makedirs(root / "checkpoints" / name)
    if complete:
        (root / "checkpoints" / name / checkpoint.STATE).write_text("{}")


def test_newest_complete_checkpoint_wins_and_partial_ones_are_ignored(tmp_path):
    assert checkpoint.latest_checkpoint(str(tmp_path)) is None
    make(tmp_path, "step_10")
    make(tmp_path, "step_2")
    make(tmp_path, "step_30.tmp")                  # killed during a save: never used
    make(tmp_path, "step_20", complete=False)      # renamed but without its trainer state: never used
    assert [s for s, _ in checkpoint.complete_checkpoints(str(tmp_path))] == [2, 10]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_10")


def test_trim_log_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    checkpoint.trim_log(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    checkpoint.trim_log(str(tmp_path / "missing.jsonl"), 4)  # nothing to trim: no error
