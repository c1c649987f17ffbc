"""stop.py: SIGINT, SIGTERM and a dead launcher ask the training loop to stop instead of killing the process."""

from __future__ import annotations

import os

from easy_context.train import stop as stop_requests


def test_sigint_and_sigterm_ask_the_loop_to_stop_instead_of_killing_it():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    stop = stop_requests.StopRequests()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the loop decides when to stop
        assert stop.requested() and stop.reason == "SIGTERM" and stop.code == 128 + signal.SIGTERM
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_dead_launcher_asks_the_loop_to_stop(monkeypatch):
    stop = stop_requests.StopRequests(parent=os.getppid())
    try:
        assert not stop.requested()
        stop.parent = os.getppid() + 1  # as after the launcher died and this process was re-parented
        assert stop.requested() and "launcher" in stop.reason and stop.code != 0
    finally:
        stop.close()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert stop_requests.launcher_pid() is None  # a plain process (nohup python train.py) outlives its shell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert stop_requests.launcher_pid() == os.getppid()
