"""benchmarks/bench_train.py's launcher: a run stopped at its timeout is stopped whole, children included, and
hands back what it printed."""

from __future__ import annotations

import sys
import time

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
