"""Run train.py on CPU (gloo) as a launch would, and read its JSONL log.

``train`` runs each rank in a process forked from the tests' forkserver (``forkserver.py``: torch, transformers,
DeepSpeed and the package already imported) with the environment ``accelerate launch`` gives that rank under the
config (read once per config and process count from a real launch), so a run starts in a second, not after the
launcher's and each worker's imports. Tests of the launcher itself (signals, a killed launcher, the printed
commands) start ``accelerate_cmd`` in a subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from tests.helpers.forkserver import CONTEXT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers/ -> the repo
TINY_ARGS = ["--seq-length", "256", "--lr", "1e-3", "--weight-decay", "0.0", "--seed", "3", "--dataset", "tiny",
             "--warmup-steps", "0", "--schedule", "constant"]  # loss on every token, constant lr
# launcher variables a forked rank must not inherit: torchrun's agent store and error file belong to its launch
_AGENT_ONLY = ("TORCHELASTIC_", "MASTER_PORT")
FAILED_PEER_GRACE_S = 5.0  # after one rank fails, how long the others may take to exit before they are killed


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def accelerate_cmd(config: str, procs: int, script: str = "train.py") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO, "accelerate_configs", config), "--num_processes", str(procs),
            "--main_process_port", "0", os.path.join(REPO, script)]


@functools.cache
def launch_env(config: str, procs: int) -> tuple[dict[str, str], ...]:
    """Per rank, the variables ``accelerate launch`` with ``config`` on ``procs`` processes sets (a real launch
    of a script that writes its environment), less those of torchrun's own agent."""
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "dump_env.py")
        with open(script, "w") as f:
            f.write("import json, os, sys\n"
                    "json.dump(dict(os.environ), open(os.path.join(sys.argv[1], os.environ['RANK']), 'w'))\n")
        cmd = accelerate_cmd(config, procs, script) + [d]
        subprocess.run(cmd, cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
        base = env()
        ranks = []
        for rank in range(procs):
            with open(os.path.join(d, str(rank))) as f:
                dumped = json.load(f)
            ranks.append({k: v for k, v in dumped.items()
                          if base.get(k) != v and not k.startswith(_AGENT_ONLY)})
    return tuple(ranks)


def torchrun_env(procs: int) -> list[dict[str, str]]:
    """Per rank, the variables ``torchrun --standalone --nproc_per_node procs`` gives its workers (none for one
    plain process)."""
    if procs == 1:
        return [{}]
    return [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs),
             "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1"} for r in range(procs)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(script: str, argv: list[str], environ: dict[str, str], stdout: str, stderr: str) -> None:
    """One forked rank: ``script`` as __main__ with ``argv``, its output to files; exits as Python would."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(REPO)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script, *argv]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: gloo may abort in a destructor after a finished run


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run_forked(script: str, argv: list[str], rank_envs: list[dict[str, str]],
               timeout: float) -> subprocess.CompletedProcess:
    """``script`` with ``argv`` on one forked process per entry of ``rank_envs`` (added to ``env()``); like
    torchrun, the first rank to fail ends the others and names the exit code. stdout and stderr: every rank's,
    rank by rank."""
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for rank, extra in enumerate(rank_envs):
            environ = {**env(), **extra, **({"MASTER_PORT": port} if "MASTER_ADDR" in extra else {})}
            out, err = os.path.join(d, f"{rank}.out"), os.path.join(d, f"{rank}.err")
            p = CONTEXT.Process(target=_rank_main, args=(script, argv, environ, out, err))
            p.start()
            procs.append((p, out, err))
        deadline, failed, timed_out = time.time() + timeout, None, False
        while any(p.is_alive() for p, _, _ in procs):
            if failed is None:
                failed = next((p for p, _, _ in procs if p.exitcode not in (None, 0)), None)
                if failed is not None:  # its peers get a few seconds to exit (and print) on their own
                    deadline = min(deadline, time.time() + FAILED_PEER_GRACE_S)
            if time.time() > deadline:
                timed_out = failed is None
                for p, _, _ in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        for p, _, _ in procs:
            p.join()
        stdout = "".join(_read(out) for _, out, _ in procs)
        stderr = "".join(_read(err) for _, _, err in procs)
    cmd = [script, *argv]
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    code = failed.exitcode if failed is not None else next((p.exitcode for p, _, _ in procs if p.exitcode), 0)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def launch(script: str, *args: str, procs: int = 1, extra_env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` (a path relative to the repo) with ``args`` on ``procs`` forked ranks as torchrun starts
    them (one: a plain process), ``extra_env`` added to every rank's environment."""
    ranks = [{**e, **(extra_env or {})} for e in torchrun_env(procs)]
    return run_forked(os.path.join(REPO, script), list(args), ranks, timeout)


def accelerate(script: str, *args: str, config: str = "zero3_offload.yaml", procs: int = 1,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``script`` (a path relative to the repo) with ``args`` on ``procs`` forked ranks, each with the
    environment ``accelerate launch`` gives it under ``config`` (module doc)."""
    return run_forked(os.path.join(REPO, script), list(args), list(launch_env(config, procs)), timeout)


def train(out: str, *args: str, config: str = "zero3_offload.yaml", procs: int = 1, check: bool = True,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """train.py with ``args`` into ``out`` on ``procs`` ranks under ``config`` (``accelerate``); raise with its
    output if it fails and ``check``."""
    res = accelerate("train.py", "--output-dir", out, *args, config=config, procs=procs, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(res.args)} under {config} on {procs} process(es) failed "
                             f"({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def python_train(out: str, *args: str) -> subprocess.CompletedProcess:
    """train.py in one plain process (no launcher): for argument and input errors."""
    return launch("train.py", "--output-dir", out, *args)


def log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]
