"""train.py end to end on CPU, launched by accelerate with the repo's DeepSpeed ZeRO-3 offload config (gloo).

The specification: a sequence-parallel run trains exactly like one process on the same data (loss at every
step and the saved weights), data parallelism splits the batch without changing the result, a killed run
resumes to the same losses, and bad input fails fast with a message that says what to change.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from launch import TINY_ARGS, accelerate_cmd, env, log, python_train, train, REPO

STEPS = ["--max-steps", "3"]
# Adam divides by sqrt(v): a gradient component near zero turns float32 rounding into an update of up to
# lr (1e-3) per step. The bound is a small fraction of that; a wrong gradient moves weights by ~lr.
WEIGHT_ATOL = 1e-4



def weights(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def assert_same_run(out: str, ref: str, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    got, want = log(out), log(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor([r["loss"] for r in want]),
                               rtol=rtol, atol=atol)
    w, r = weights(out), weights(ref)
    assert w.keys() == r.keys()
    for k in w:
        torch.testing.assert_close(w[k], r[k], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"weight {k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no sequence parallelism: the run every other layout must reproduce."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    train(out, "--backend", "data_parallel", *TINY_ARGS, *STEPS)
    return out


def test_reference_run_trains_and_saves_a_loadable_model(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = log(reference)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 1e-3 on a random model: the loss must move down
    assert all(r["tokens_per_s"] > 0 and r["lr"] == 1e-3 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(reference, "model"))
    init = AutoModelForCausalLM.from_pretrained(os.path.join(reference, "tiny_init"))
    assert model.config.max_position_embeddings == 256
    moved = [(a - b).abs().max().item() for a, b in zip(model.parameters(), init.parameters())]
    assert min(moved) > 0, "every parameter must have been trained and gathered from the ZeRO-3 shards"
    assert AutoTokenizer.from_pretrained(os.path.join(reference, "model"))("7")["input_ids"]


@pytest.mark.parametrize("backend", ["zigzag_ring", "ulysses", "ring", "dist_flash", "usp"])
def test_sequence_parallel_run_equals_single_process(reference, tmp_path, backend):
    out = str(tmp_path / backend)
    train(out, "--backend", backend, *TINY_ARGS, *STEPS, procs=2)
    assert_same_run(out, reference)


def test_data_parallel_splits_the_batch_exactly(tmp_path):
    one = str(tmp_path / "one")
    train(one, "--backend", "data_parallel", "--batch-size", "2", *TINY_ARGS, "--max-steps", "2")
    two = str(tmp_path / "two")  # 2 DP ranks x 1 row each: the same 2 rows per step, split by DP rank
    train(two, "--backend", "data_parallel", "--batch-size", "1", *TINY_ARGS, "--max-steps", "2", procs=2)
    assert [r["tokens"] for r in log(two)] == [r["tokens"] for r in log(one)] == [512, 1024]
    assert_same_run(two, one)


def test_plain_ddp_config_trains_like_deepspeed(reference, tmp_path):
    out = str(tmp_path / "ddp")
    train(out, "--backend", "zigzag_ring", *TINY_ARGS, *STEPS, config="ddp.yaml", procs=2)
    assert_same_run(out, reference)  # torch AdamW under DDP == DeepSpeedCPUAdam under ZeRO-3 (no weight decay)


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    args = ["--backend", "zigzag_ring", *TINY_ARGS, "--max-steps", "12", "--checkpoint-every", "3"]
    full = str(tmp_path / "full")
    train(full, *args, procs=2)
    killed = str(tmp_path / "killed")
    cmd = accelerate_cmd("zero3_offload.yaml", 2) + ["--output-dir", killed, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = os.path.join(killed, "checkpoints", "step_3", "trainer_state.json")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first), "the run ended before its first checkpoint"
    assert not os.path.exists(os.path.join(killed, "model")), "killed before the end: no final model"
    # A kill during a later checkpoint write leaves a .tmp directory; it must never be resumed from.
    root = os.path.join(killed, "checkpoints")
    newest = sorted(os.listdir(root))[-1]
    shutil.copytree(os.path.join(root, newest), os.path.join(root, "step_11.tmp"))
    train(killed, *args, "--resume", procs=2)
    done, want = log(killed), log(full)
    assert [r["step"] for r in done] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in done]), torch.tensor([r["loss"] for r in want]),
                               rtol=1e-5, atol=1e-5)
    assert not any(name.endswith(".tmp") for name in os.listdir(root))
    assert len(os.listdir(root)) == 2  # --keep-checkpoints 2


def test_rerun_into_a_finished_output_dir_is_refused(reference):
    res = python_train(reference, "--backend", "data_parallel", *TINY_ARGS)
    assert res.returncode != 0 and "--resume" in res.stderr and "already holds a run" in res.stderr


@pytest.mark.parametrize("case, args, message", [
    ("length", ["--backend", "zigzag_ring", "--seq-length", "255"], "multiple of"),
    ("rope", ["--backend", "data_parallel", "--rope-scaling", "warp:factor=2"], "unknown rope scaling type"),
    ("column", ["--backend", "data_parallel", "--dataset", "{jsonl_no_column}"], "needs a pre-tokenized"),
    ("short", ["--backend", "data_parallel", "--dataset", "{jsonl_short_ids}"], "hold fewer than --seq-length"),
])
def test_bad_input_fails_before_the_model_loads(tmp_path, case, args, message):
    import json

    no_column = tmp_path / "no_column.jsonl"
    no_column.write_text("\n".join(json.dumps({"body": "some text"}) for _ in range(4)))
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"input_ids": list(range(100))}) for _ in range(4)))
    args = [a.format(jsonl_no_column=no_column, jsonl_short_ids=short) for a in args]
    out = str(tmp_path / case)
    res = python_train(out, "--seq-length", "256", *args)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr  # failed before any model was loaded


def test_time_limit_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    out = str(tmp_path / "limited")
    train(out, "--backend", "data_parallel", *TINY_ARGS, "--max-steps", "50", "--time-limit", "1e-6",
          config="ddp.yaml", procs=2)
    assert [r["step"] for r in log(out)] == [1]
    assert os.path.exists(os.path.join(out, "model", "config.json"))


def test_kept_attention_outputs_train_exactly_like_recompute(reference, tmp_path):
    out = str(tmp_path / "keep")
    train(out, "--backend", "zigzag_ring", *TINY_ARGS, *STEPS, "--keep-attention", procs=2)
    assert_same_run(out, reference)


def test_fused_pointwise_ops_train_like_eager(reference, tmp_path):
    out = str(tmp_path / "fused")
    train(out, "--backend", "zigzag_ring", *TINY_ARGS, *STEPS, "--keep-attention", "--fuse-pointwise", procs=2)
    assert_same_run(out, reference)
