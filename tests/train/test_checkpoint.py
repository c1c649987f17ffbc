"""checkpoint.py: only complete checkpoints are ever resumed from."""

from __future__ import annotations

import json
import os

import pytest

from easy_context.train import checkpoint


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


def signed(root, step: int, files: dict[str, bytes] | None = None) -> str:
    """A complete checkpoint with ``files`` (relative path -> bytes) and its digest manifest."""
    path = root / "checkpoints" / f"step_{step}"
    for rel, data in (files or {"pytorch_model/shard.pt": b"weights %d" % step}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    (path / checkpoint.STATE).write_text(json.dumps({"step": step}))
    checkpoint.write_manifest(str(path))
    return str(path)


def test_a_checkpoint_is_trusted_only_file_for_file_as_written(tmp_path):
    path = signed(tmp_path, 3, {"pytorch_model/a.pt": b"aaaa", "random_states_0.pkl": b"rng"})
    checkpoint.verify_checkpoint(path)
    shard = os.path.join(path, "pytorch_model", "a.pt")
    with open(shard, "wb") as f:
        f.write(b"aaab")
    with pytest.raises(checkpoint.CheckpointError, match=r"pytorch_model/a.pt.*digest"):
        checkpoint.verify_checkpoint(path)
    with open(shard, "wb") as f:
        f.write(b"aaaa")
    with open(os.path.join(path, "custom_checkpoint_0.pkl"), "wb") as f:  # accelerate would unpickle it
        f.write(b"planted")
    with pytest.raises(checkpoint.CheckpointError, match="custom_checkpoint_0.pkl.*not in the manifest"):
        checkpoint.verify_checkpoint(path)
    os.remove(os.path.join(path, "custom_checkpoint_0.pkl"))
    os.remove(os.path.join(path, "random_states_0.pkl"))
    with pytest.raises(checkpoint.CheckpointError, match="random_states_0.pkl.*missing"):
        checkpoint.verify_checkpoint(path)
    make(tmp_path, "step_1")  # written before manifests existed: refused, with the way to vouch for it
    with pytest.raises(checkpoint.CheckpointError, match="write_manifest"):
        checkpoint.verify_checkpoint(str(tmp_path / "checkpoints" / "step_1"))


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    signed(tmp_path, 2)
    signed(tmp_path, 4)
    newest = signed(tmp_path, 6)
    with open(os.path.join(newest, "pytorch_model", "shard.pt"), "ab") as f:
        f.write(b"bit rot")
    got = checkpoint.resume_point(str(tmp_path), resume=True)
    assert got.endswith("step_4")
    assert "step_6" in capsys.readouterr().err  # the warning names what was skipped
    assert checkpoint.resume_point(str(tmp_path), resume=False, resume_from="step_2").endswith("step_2")
    assert checkpoint.resume_point(str(tmp_path), resume=True, resume_from=os.path.join(
        str(tmp_path), "checkpoints", "step_4")).endswith("step_4")
    with pytest.raises(SystemExit, match="step_6.*digest"):  # a named pick is never swapped for another
        checkpoint.resume_point(str(tmp_path), resume=True, resume_from="step_6")
    with pytest.raises(SystemExit, match=r"step_5.*step_2, step_4, step_6"):
        checkpoint.resume_point(str(tmp_path), resume=True, resume_from="step_5")
    with open(os.path.join(tmp_path, "checkpoints", "step_2", checkpoint.STATE), "a") as f:
        f.write(" ")
    with open(os.path.join(tmp_path, "checkpoints", "step_4", checkpoint.STATE), "a") as f:
        f.write(" ")
    with pytest.raises(SystemExit, match="no checkpoint.*passes"):
        checkpoint.resume_point(str(tmp_path), resume=True)


def test_resume_needs_something_to_resume_and_never_replaces_a_finished_model(tmp_path):
    assert checkpoint.resume_point(str(tmp_path), resume=False) is None  # a fresh run
    assert checkpoint.resume_point(str(tmp_path), resume=True) is None  # the scripts' first launch: a fresh run
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # a run trained here, no checkpoint
    with pytest.raises(SystemExit, match="--checkpoint-every"):
        checkpoint.resume_point(str(tmp_path), resume=True)
    signed(tmp_path, 2)
    with pytest.raises(SystemExit, match="already holds a run: pass --resume"):
        checkpoint.resume_point(str(tmp_path), resume=False)
    os.makedirs(tmp_path / "model")
    for kw in [dict(resume=True), dict(resume=False), dict(resume=False, resume_from="step_2")]:
        with pytest.raises(SystemExit, match="never overwritten"):
            checkpoint.resume_point(str(tmp_path), **kw)


class FakeAccelerator:
    """What save_checkpoint and load_checkpoint use of an Accelerator, on one process."""

    is_main_process = True

    def __init__(self, engine=None):
        self._models = [] if engine is None else [engine]
        self.loaded = None

    def save_state(self, path):
        os.makedirs(os.path.join(path, "pytorch_model"))
        with open(os.path.join(path, "pytorch_model", "shard.pt"), "wb") as f:
            f.write(b"shard")

    def load_state(self, path):
        self.loaded = [m.checkpoint_engine.load(os.path.join(path, "pytorch_model", "shard.pt"))
                       for m in self._models]


def test_save_checkpoint_signs_every_file_before_the_rename(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        if src.endswith(".tmp") and os.path.isdir(src):
            renamed.append(os.path.exists(os.path.join(src, checkpoint.MANIFEST)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = checkpoint.save_checkpoint(FakeAccelerator(), str(tmp_path), 5, {"tokens": 1, "epoch": 0, "row": 5})
    assert renamed == [True]
    checkpoint.verify_checkpoint(path)
    assert checkpoint.resume_point(str(tmp_path), resume=True) == path


class Payload:
    """Unpickling it writes a marker file: what a planted checkpoint shard could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_checkpoint_shards_load_as_data_only(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = str(tmp_path / "payload_ran")
    bad = str(tmp_path / "bad.pt")
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, bad)
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt"):
        checkpoint.safe_torch_load(bad)
    assert not os.path.exists(marker)
    good = str(tmp_path / "optim.pt")  # what DeepSpeed's ZeRO optimizer states hold besides tensors
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                                         "fp32": torch.arange(3.0)}}, good)
    sd = checkpoint.safe_torch_load(good, map_location="cpu")
    assert sd["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.weights
    assert torch.equal(sd["optimizer_state_dict"]["fp32"], torch.arange(3.0))


def test_load_checkpoint_makes_deepspeed_load_its_shards_as_data_only(tmp_path):
    import types

    import torch

    path = checkpoint.save_checkpoint(FakeAccelerator(), str(tmp_path), 1, {"tokens": 1, "epoch": 0, "row": 1})
    unsafe = types.SimpleNamespace(load=lambda p, map_location=None: torch.load(p, weights_only=False))
    accelerator = FakeAccelerator(types.SimpleNamespace(checkpoint_engine=unsafe))
    marker = str(tmp_path / "payload_ran")
    shard = os.path.join(path, "pytorch_model", "shard.pt")
    torch.save({"w": torch.ones(2)}, shard)
    checkpoint.write_manifest(path)  # even with the digests rewritten to match (a writer who knows the scheme)
    assert checkpoint.load_checkpoint(accelerator, path)["step"] == 1
    assert torch.equal(accelerator.loaded[0]["w"], torch.ones(2))
    torch.save(Payload(marker), shard)
    checkpoint.write_manifest(path)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(accelerator, path)
    assert not os.path.exists(marker)
