"""The run's log: one JSON record per optimizer step in ``OUTPUT/log.jsonl`` (main process), and wandb when a
project is given. A resumed run first cuts the log back to its checkpoint's step."""

from __future__ import annotations

import json
import os

LOG = "log.jsonl"


def log_path(output_dir: str) -> str:
    """The JSONL log of the run in ``output_dir``."""
    return os.path.join(output_dir, LOG)


def trim_log(path: str, step: int) -> None:
    """Keep only the JSONL records of steps <= ``step`` (what a killed run logged past its checkpoint goes, and
    a last line it left half written); ValueError naming the line for damage before the last line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not a JSON record: repair or remove it") from None
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class RunLog:
    """The run's JSONL log at ``path`` (always, main process) and wandb (when a project is given)."""

    def __init__(self, path: str, *, main: bool, resume_step: int = 0, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.path = path
        self.main = main
        self.wandb = None
        if not main:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        trim_log(path, resume_step)  # what a killed run logged after the checkpoint we resume from goes
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def write(self, record: dict) -> None:
        """Append ``record`` (it holds its "step") on the main process."""
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
