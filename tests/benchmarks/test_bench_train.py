"""benchmarks/bench_train.py's launcher: a run stopped at its timeout is stopped whole, children included, and
hands back what it printed; a harness stopped by a signal takes its launch down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import bench_train

# A launcher (accelerate, torchrun) whose worker outlives it unless the whole process group is killed.
LAUNCHER = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('step 1', flush=True); time.sleep(60)")


def test_a_timed_out_launch_is_stopped_with_its_children_and_keeps_what_it_printed():
    started = time.time()
    out, returncode, timed_out = bench_train.run_command([sys.executable, "-c", LAUNCHER], None, timeout=3)
    assert time.time() - started < 15, "the worker kept the output pipe open past the timeout"
    assert timed_out and returncode != 0 and "step 1" in out


def test_a_finished_command_returns_its_output_and_exit_status():
    out, returncode, timed_out = bench_train.run_command(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], None, 30)
    assert (returncode, timed_out) == (3, False) and "out" in out and "err" in out


# A harness running LAUNCHER (its worker writes its pid to the file argv[1]) under run_command until signalled.
HARNESS = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_train; "
           "worker = f'import os, time; open({sys.argv[1]!r}, \"w\").write(str(os.getpid())); time.sleep(60)'; "
           "launcher = f'import subprocess, sys, time; subprocess.Popen([sys.executable, \"-c\", {worker!r}]); "
           "time.sleep(60)'; bench_train.run_command([sys.executable, '-c', launcher], None, timeout=60)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_harness_stopped_by_ctrl_c_or_sigterm_stops_the_launch_it_was_waiting_for(tmp_path, sig):
    pid_file = tmp_path / "worker.pid"
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, str(pid_file)], cwd=bench_train.REPO)
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    harness.send_signal(sig)
    harness.wait(timeout=30)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the launch's worker outlived the harness and would hold the GPU"
