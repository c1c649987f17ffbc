"""Run train.py as a user would: ``accelerate launch`` with a repo config, on CPU (gloo), reading its JSONL log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers/ -> the repo
TINY_ARGS = ["--seq-length", "256", "--lr", "1e-3", "--weight-decay", "0.0", "--seed", "3", "--dataset", "tiny",
             "--warmup-steps", "0", "--schedule", "constant"]  # loss on every token, constant lr


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def accelerate_cmd(config: str, procs: int, script: str = "train.py") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO, "accelerate_configs", config), "--num_processes", str(procs),
            "--main_process_port", "0", os.path.join(REPO, script)]


def train(out: str, *args: str, config: str = "zero3_offload.yaml", procs: int = 1, check: bool = True,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Launch train.py with ``args`` into ``out``; raise with its output if it fails and ``check``."""
    cmd = accelerate_cmd(config, procs) + ["--output-dir", out, *args]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def python_train(out: str, *args: str) -> subprocess.CompletedProcess:
    """train.py in one plain process (no launcher): for argument and input errors."""
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--output-dir", out, *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)


def log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]
