"""run_lock.py: one run per output directory; a dead holder's lock is taken over, a live one's is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from easy_context.train import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def acquire_elsewhere(out: str) -> subprocess.CompletedProcess:
    """Try to take the lock from another process (this one may hold it)."""
    code = f"from easy_context.train import run_lock; run_lock.acquire({out!r}); print('taken')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_output_dir_is_refused_with_the_holder_named(tmp_path):
    out = str(tmp_path / "run")
    path = run_lock.acquire(out)
    try:
        holder = json.loads(open(path).read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        res = acquire_elsewhere(out)
        assert res.returncode != 0 and "taken" not in res.stdout
        assert f"pid {os.getpid()}" in res.stderr and socket.gethostname() in res.stderr
        assert holder["started"] in res.stderr
    finally:
        run_lock.release_held()
    assert not os.path.exists(path)
    assert "taken" in acquire_elsewhere(out).stdout  # released: the next run may start (and its exit frees it)
    assert not os.path.exists(path)


@pytest.mark.parametrize("case", ["dead pid", "reused pid"])
def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, case):
    out = tmp_path / "run"
    out.mkdir()
    # a reused pid: alive, but not the process that took the lock (its start time differs)
    pid, start = (dead_pid(), None) if case == "dead pid" else (os.getpid(), "1")
    (out / run_lock.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                 "started": "2026-01-01 00:00:00", "pid_start": start}))
    res = acquire_elsewhere(str(out))
    assert res.returncode == 0 and "taken" in res.stdout, res.stderr


def test_a_lock_from_another_host_is_never_guessed_stale(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_lock.LOCK).write_text(json.dumps({"pid": dead_pid(), "host": "node-that-is-not-here",
                                                 "started": "2026-01-01 00:00:00"}))
    res = acquire_elsewhere(str(out))
    assert res.returncode != 0 and "node-that-is-not-here" in res.stderr and "delete" in res.stderr
    run_lock.release_held()  # not ours: left alone
    assert (out / run_lock.LOCK).exists()
