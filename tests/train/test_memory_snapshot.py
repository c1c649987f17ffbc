"""memory_snapshot.py: the GPU memory at a step's peak, by the line of code that allocated it."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch

from easy_context.train import loop, memory_snapshot
from easy_context.train.config import parse_config
from easy_context.train.memory_snapshot import BEFORE, allocation_site, live_at_peak, summarize

GIB = 2 ** 30
TORCH_FRAME = {"filename": os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "module.py"),
               "line": 1775, "name": "_call_impl"}


def frames(site: str, line: int, name: str) -> list[dict]:
    """A stack as the allocator records it, innermost first: torch's own frame, then the code that called it."""
    return [TORCH_FRAME, {"filename": f"/opt/lib/{site}", "line": line, "name": name},
            {"filename": "/opt/lib/train.py", "line": 1, "name": "main"}]


def snapshot_of_one_step() -> dict:
    """Weights (4 GiB) and a 2 GiB buffer live before recording began; the trace then allocates two layer
    activations (3 and 2 GiB) and a 1 GiB loss chunk, and frees the buffer and the activations (the first one's
    free requested before the second is allocated, completed after: another stream was still reading it)."""
    layer, loss = frames("model/layer.py", 10, "forward"), frames("model/loss.py", 5, "chunk")
    trace = [{"action": "alloc", "addr": 0x200, "size": 3 * GIB, "frames": layer},           # 9 GiB live
             {"action": "free_requested", "addr": 0x900, "size": 2 * GIB, "frames": []},
             {"action": "free_completed", "addr": 0x900, "size": 2 * GIB, "frames": []},     # 7
             {"action": "alloc", "addr": 0x300, "size": 1 * GIB, "frames": loss},            # 8
             {"action": "segment_alloc", "addr": 0x5000, "size": 8 * GIB, "frames": []},     # not a tensor
             {"action": "free_requested", "addr": 0x200, "size": 3 * GIB, "frames": []},     # still in use
             {"action": "alloc", "addr": 0x400, "size": 2 * GIB, "frames": layer},           # 10: the peak
             {"action": "free_completed", "addr": 0x200, "size": 3 * GIB, "frames": []},     # 7
             {"action": "free_completed", "addr": 0x400, "size": 2 * GIB, "frames": []}]     # 5
    blocks = [{"address": 0x100, "size": 4 * GIB, "state": "active_allocated", "frames": []},
              {"address": 0x300, "size": 1 * GIB, "state": "active_allocated", "frames": loss},
              {"address": 0x500, "size": 6 * GIB, "state": "inactive", "frames": []}]
    return {"segments": [{"device": 0, "blocks": blocks}], "device_traces": [trace]}


def test_the_site_is_the_innermost_frame_outside_torch_with_its_path_as_imported(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/opt", "/opt/lib"])  # the longest root that holds the file wins
    assert allocation_site(frames("model/layer.py", 10, "forward")) == "model/layer.py:10 (forward)"
    assert allocation_site([TORCH_FRAME]).endswith("module.py:1775 (_call_impl)")  # all plumbing: the innermost
    assert allocation_site([]) == BEFORE


def test_the_live_set_at_the_peak_includes_what_lived_before_the_trace_began():
    peak, blocks = live_at_peak(snapshot_of_one_step())
    assert peak == 10 * GIB
    assert sorted(size // GIB for size, _ in blocks) == [1, 2, 3, 4]  # weights, both activations, the loss chunk


def test_a_trace_without_completed_frees_frees_at_the_request():
    trace = [{"action": "alloc", "addr": 1, "size": 5, "frames": []},
             {"action": "free_requested", "addr": 1, "size": 5, "frames": []},
             {"action": "alloc", "addr": 2, "size": 3, "frames": []}]
    assert live_at_peak({"segments": [], "device_traces": [trace]})[0] == 5


def test_the_summary_groups_the_peak_by_site_largest_first(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/opt/lib"])
    lines = summarize(snapshot_of_one_step()).splitlines()
    assert lines[0] == "GPU memory live at the peak of the recorded trace: 10.00 GiB"
    assert lines[2:] == ["  5.00       2  model/layer.py:10 (forward)",
                         f"  4.00       1  {BEFORE}",
                         "  1.00       1  model/loss.py:5 (chunk)"]
    assert summarize(snapshot_of_one_step(), top=1).splitlines()[-1] == "  5.00       2  (2 other sites)"


def test_an_allocation_that_ran_out_of_memory_is_named_with_its_size_and_site(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/opt/lib"])
    snapshot = snapshot_of_one_step()
    snapshot["device_traces"][0].append({"action": "oom", "addr": 0, "size": 3 * GIB,
                                         "frames": frames("model/mlp.py", 7, "forward")})
    assert summarize(snapshot).splitlines()[-1] == "out of memory asking for 3.00 GiB at model/mlp.py:7 (forward)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_the_flag_is_refused_on_a_machine_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU; leave the flag out on CPU"):
        parse_config(["--memory-snapshot", str(tmp_path / "step.pickle")])


def test_an_existing_file_or_a_missing_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "old.pickle.txt").write_text("a summary a user kept")
    with pytest.raises(SystemExit, match="old.pickle.txt exists and is never overwritten"):
        parse_config(["--memory-snapshot", str(tmp_path / "old.pickle")])
    with pytest.raises(SystemExit, match="no folder"):
        parse_config(["--memory-snapshot", str(tmp_path / "missing" / "step.pickle")])
    assert parse_config(["--memory-snapshot", str(tmp_path / "new.pickle")]).memory_snapshot.endswith("new.pickle")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_snapshot_names_the_line_that_allocated_the_peak(tmp_path):
    path = str(tmp_path / "step.pickle")
    recorder = memory_snapshot.MemorySnapshot(path)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # the largest allocation since recording
    line = sys._getframe().f_lineno - 1
    recorder.dump()
    recorder.dump()  # once only
    summary = open(path + ".txt").read()
    site = f"test_memory_snapshot.py:{line} (test_on_a_gpu_the_snapshot_names_the_line_that_allocated_the_peak)"
    assert [row.split()[:2] for row in summary.splitlines() if site in row] == [["0.25", "1"]], summary
    with open(path, "rb") as f:
        assert "device_traces" in pickle.load(f)
    del big


class Recorder:
    """Stands in for MemorySnapshot on CPU: counts the dumps."""

    made: list["Recorder"] = []

    def __init__(self, path: str):
        self.path, self.dumps = path, 0
        Recorder.made.append(self)

    def dump(self) -> None:
        self.dumps += 1


class Accelerator:
    def __init__(self, main: bool):
        self.is_main_process, self.sync_gradients = main, False


class RunLog:
    def write(self, record: dict) -> None:
        pass


@pytest.mark.parametrize("main", [True, False])
def test_the_training_loop_dumps_once_the_second_optimizer_step_ends_on_rank_0_only(monkeypatch, tmp_path, main):
    # the first step builds the optimizer's state; the second is a steady step, whose backward peaks higher
    monkeypatch.setattr(loop, "MemorySnapshot", Recorder)
    Recorder.made = []
    accelerator = Accelerator(main)
    train_loop = loop.TrainLoop(accelerator, str(tmp_path), RunLog(), {"step": 0, "tokens": 0, "epoch": 0, "row": 0},
                                stop=None, tokens_per_step=8, max_steps=3, grad_accum=2,
                                memory_snapshot=str(tmp_path / "step.pickle"))
    dumps = []
    for micro in range(6):
        accelerator.sync_gradients = micro % 2 == 1  # two micro-steps per optimizer step
        train_loop.end_micro(1e-3, 0, micro)
        dumps.append(sum(r.dumps for r in Recorder.made))
    assert dumps == ([0, 0, 0, 1, 1, 1] if main else [0] * 6)


@pytest.mark.parametrize("saved_step, max_steps, dumped_after", [(0, 1, 1), (5, 6, 1), (5, 9, 2)])
def test_a_run_of_one_step_or_a_resumed_one_dumps_after_its_own_steps(monkeypatch, tmp_path, saved_step, max_steps,
                                                                       dumped_after):
    monkeypatch.setattr(loop, "MemorySnapshot", Recorder)
    Recorder.made = []
    accelerator = Accelerator(True)
    accelerator.sync_gradients = True
    saved = {"step": saved_step, "tokens": 0, "epoch": 0, "row": 0}
    train_loop = loop.TrainLoop(accelerator, str(tmp_path), RunLog(), saved, stop=None, tokens_per_step=8,
                                max_steps=max_steps, memory_snapshot=str(tmp_path / "step.pickle"))
    dumps = []
    for micro in range(max_steps - saved_step):
        train_loop.end_micro(1e-3, 0, micro)
        dumps.append(Recorder.made[0].dumps)
    assert dumps.index(1) + 1 == dumped_after and dumps[-1] == 1
