"""loop.py's TrainLoop: the step time it logs is the device's, not the host's head start."""

from __future__ import annotations

import time

from easy_context.train import loop


class Accelerator:
    is_main_process, sync_gradients = True, True


class RunLog:
    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def test_a_step_ends_when_the_device_has_finished_its_queued_work(monkeypatch, tmp_path):
    # A GPU runs behind the host: after optimizer.step() returns, the backward may still be running there. A step
    # timed on the host clock alone would leave that tail out (or move it to the next step).
    queued = []  # seconds of device work still running when the host reaches the end of each step
    monkeypatch.setattr(loop, "wait_for_device", lambda: time.sleep(queued.pop(0)))
    log = RunLog()
    train_loop = loop.TrainLoop(Accelerator(), str(tmp_path), log, {"step": 0, "tokens": 0, "epoch": 0, "row": 0},
                                stop=None, tokens_per_step=8, max_steps=2)
    for step, tail in enumerate([0.05, 0.3]):
        queued.append(tail)
        train_loop.end_micro(1e-3, 0, step)
    assert log.records[1]["step_s"] >= 0.3
    assert log.records[1]["tokens_per_s"] <= 8 / 0.3
