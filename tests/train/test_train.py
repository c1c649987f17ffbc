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
import sys
import time

import pytest
import torch

from tests.helpers.launch import (TINY_ARGS, accelerate_cmd, env, log, python_train, run_forked, torchrun_env, train,
                                  REPO)

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
    for pid in [*children(proc.pid), proc.pid]:  # torchrun starts each worker in a session of its own
        os.kill(pid, signal.SIGKILL)
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


def test_a_step_out_of_gpu_memory_prints_the_options_left_and_fails(tmp_path):
    script = tmp_path / "train_out_of_memory.py"  # train.py with every micro-step failing as an OOM does
    script.write_text(
        "import runpy, sys, torch\n"
        "from easy_context.train import prepare\n"
        "def out_of_memory(*args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "prepare.micro_step = out_of_memory\n"
        f"sys.argv[0] = {os.path.join(REPO, 'train.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    res = run_forked(str(script), ["--output-dir", str(tmp_path / "run"), *TINY_ARGS], torchrun_env(1), 300)
    assert res.returncode == 1 and "torch.OutOfMemoryError: CUDA out of memory" in res.stderr, res.stderr[-3000:]
    advice = res.stderr.split("What lowers this run's peak:\n")[1]
    flags = [line.split(":")[0].strip() for line in advice.split("\n\n")[0].splitlines()]
    assert flags[:4] == ["--offload-activations", "--layers-per-checkpoint 2", "--tiled-mlp 4096",
                         "accelerate_configs/zero3_offload_optimizer.yaml"]  # the tiny model's 4 layers on CPU


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


@pytest.mark.parametrize("case, args, message", [
    ("lr", ["--lr", "-0.001"], "--lr must be a finite number > 0"),
    ("rope", ["--rope-scaling", "linear:factor=0"], "factor must be a finite number >= 1"),
    ("vocab", ["--dataset", "{jsonl_big_ids}"], "row 2 holds token id 100000, outside the model's vocabulary"),
])
def test_nonsense_arguments_and_rows_fail_before_the_model_loads(tmp_path, case, args, message):
    import json

    rows = [list(range(256))] * 4
    rows[2] = rows[2][:100] + [100_000] + rows[2][101:]
    (tmp_path / "big_ids.jsonl").write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    out = str(tmp_path / case)
    args = [a.format(jsonl_big_ids=tmp_path / "big_ids.jsonl") for a in args]
    res = python_train(out, "--backend", "data_parallel", "--seq-length", "256", *args)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr
    assert case == "vocab" or not os.path.exists(out)  # flags are refused before anything is written


# --- runs that are stopped, interrupted, diverge, collide or are tampered with ------------------------------

def lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def wait_for_steps(out: str, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    path, deadline = os.path.join(out, "log.jsonl"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len([x for x in lines(path) if x.endswith("}")]) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged in {out} (exit code {proc.poll()})")


def running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that have not exited (an exited orphan may stay a zombie here)."""
    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"
    return [pid for pid in pids if state(pid) not in ("Z", "gone")]


def children(pid: int) -> list[int]:
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(child))
        except OSError:
            pass
    return found


def checkpoints(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """One process training with no end; a second run into its directory; then SIGTERM (a scheduler's stop)."""
    out = str(tmp_path_factory.mktemp("busy") / "run")
    err = out + ".stderr"
    with open(err, "w") as f:
        first = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--output-dir", out,
                                  "--backend", "data_parallel", *TINY_ARGS, "--max-steps", "100000"],
                                 cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_steps(out, 2, first)
        second = python_train(out, "--backend", "data_parallel", *TINY_ARGS, "--max-steps", "1")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    return dict(out=out, pid=first.pid, code=first.returncode, output=open(err).read(), second=second)


def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(sigterm_run):
    import socket

    res = sigterm_run["second"]
    assert res.returncode != 0, "two runs trained into one output directory"
    assert f"pid {sigterm_run['pid']}" in res.stderr and socket.gethostname() in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr  # refused before any model was loaded


def test_sigterm_saves_a_checkpoint_at_the_step_it_stops_and_says_how_to_resume(sigterm_run):
    out = sigterm_run["out"]
    assert sigterm_run["code"] == 128 + signal.SIGTERM, sigterm_run["output"][-3000:]
    [name] = checkpoints(out)
    step = int(name.split("_")[1])
    assert [r["step"] for r in log(out)] == list(range(1, step + 1))  # the checkpoint holds every logged step
    assert os.path.join("checkpoints", name) in sigterm_run["output"] and "--resume" in sigterm_run["output"]
    assert "Traceback" not in sigterm_run["output"]
    assert not os.path.exists(os.path.join(out, "model"))
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out


def test_resume_of_a_finished_run_is_refused_and_leaves_its_model_and_log_alone(reference, tmp_path):
    def snapshot():
        model = sorted(os.listdir(os.path.join(reference, "model")))
        files = ["log.jsonl", *(os.path.join("model", n) for n in model)]
        return {n: open(os.path.join(reference, n), "rb").read() for n in files}

    before = snapshot()
    res = python_train(reference, "--backend", "data_parallel", *TINY_ARGS, *STEPS, "--resume")
    assert res.returncode != 0 and "never overwritten" in res.stderr, res.stderr[-3000:]
    assert snapshot() == before
    killed = tmp_path / "killed"  # a run killed before it wrote any checkpoint (or ran without them)
    killed.mkdir()
    shutil.copy(os.path.join(reference, "log.jsonl"), killed / "log.jsonl")
    res = python_train(str(killed), "--backend", "data_parallel", *TINY_ARGS, *STEPS, "--resume")
    assert res.returncode != 0 and "--checkpoint-every" in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr
    assert (killed / "log.jsonl").read_bytes() == before["log.jsonl"]


def test_a_non_finite_loss_stops_every_rank_with_the_last_finite_state_saved(tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "diverged")  # lr 1e30: Adam moves each weight by ~lr, and step 2's forward overflows
    res = train(out, "--backend", "data_parallel", *TINY_ARGS, "--lr", "1e30", "--max-steps", "5",
                config="ddp.yaml", procs=2, check=False)
    assert res.returncode != 0, "a diverged run must not end as a success"
    assert "step 2" in res.stderr and "not finite" in res.stderr, res.stderr[-3000:]
    assert [r["step"] for r in log(out)] == [1]
    assert checkpoints(out) == ["step_1"] and not os.path.exists(os.path.join(out, "model"))
    saved = os.path.join(out, "checkpoints", "step_1")
    stack = [load_file(os.path.join(saved, "model.safetensors")),
             torch.load(os.path.join(saved, "optimizer.bin"), weights_only=True)]
    while stack:  # weights and Adam moments after step 1: stepping through the NaN loss would make them NaN
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            assert torch.isfinite(x).all()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


INTERRUPTED_ARGS = ["--backend", "zigzag_ring", *TINY_ARGS, "--max-steps", "10"]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A 2-process DeepSpeed run stopped by Ctrl-C after a few steps."""
    out = str(tmp_path_factory.mktemp("interrupted") / "run")
    with open(out + ".output", "w") as f:
        proc = subprocess.Popen(accelerate_cmd("zero3_offload.yaml", 2) + ["--output-dir", out, *INTERRUPTED_ARGS],
                                cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        wait_for_steps(out, 2, proc)
        workers = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher, which passes it on
        proc.wait(timeout=300)
    finally:
        for pid in running([*workers, proc.pid]):
            os.kill(pid, signal.SIGKILL)
    return dict(out=out, output=open(out + ".output").read())


def test_ctrl_c_checkpoints_every_rank_at_one_step_and_resumes_exactly(interrupted_run, tmp_path):
    output = interrupted_run["output"]
    out = str(tmp_path / "run")
    shutil.copytree(interrupted_run["out"], out)
    [name] = checkpoints(out)
    step = int(name.split("_")[1])
    assert step < 10 and [r["step"] for r in log(out)] == list(range(1, step + 1)), output[-3000:]
    assert os.path.join("checkpoints", name) in output and "--resume" in output
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": %d, "loss": 1.2' % (step + 1))  # a kill in the middle of a log line
    train(out, *INTERRUPTED_ARGS, "--resume", procs=2)
    ref = str(tmp_path / "uninterrupted")
    train(ref, "--backend", "data_parallel", *TINY_ARGS, "--max-steps", "10")
    assert_same_run(out, ref)


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(interrupted_run, tmp_path):
    from easy_context.train import checkpoint

    class Payload:
        def __reduce__(self):
            return exec, (f"open({marker!r}, 'w').write('ran')",)

    out, marker = str(tmp_path / "run"), str(tmp_path / "payload_ran")
    shutil.copytree(interrupted_run["out"], out)
    [name] = checkpoints(out)
    shard = os.path.join(out, "checkpoints", name, "pytorch_model", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"module": {}, "payload": Payload()}, shard)
    res = train(out, *INTERRUPTED_ARGS, "--resume", procs=2, check=False)
    assert res.returncode != 0 and "zero_pp_rank_0_mp_rank_00_model_states.pt" in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr  # refused by its digest, before anything loads
    checkpoint.write_manifest(os.path.join(out, "checkpoints", name))  # a writer who also rewrote the digests
    res = train(out, *INTERRUPTED_ARGS, "--resume", procs=2, check=False)  # DeepSpeed unpickles its shards
    assert res.returncode != 0 and "refusing to load" in res.stderr, res.stderr[-3000:]
    assert not os.path.exists(marker), "resume unpickled code from a checkpoint"
    assert not os.path.exists(os.path.join(out, "model"))


def test_killing_only_the_launcher_stops_its_workers_after_a_checkpoint(tmp_path):
    out = str(tmp_path / "orphans")
    cmd = accelerate_cmd("zero3_offload.yaml", 2) + ["--output-dir", out, "--backend", "zigzag_ring", *TINY_ARGS,
                                                     "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    workers = []
    try:
        wait_for_steps(out, 2, proc)
        workers = children(proc.pid)  # torchrun starts each in a session of its own
        assert len(workers) == 2
        proc.kill()  # the launcher alone (SIGKILL: it can forward nothing)
        proc.wait()
        deadline = time.time() + 180
        while running(workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not running(workers), "the workers kept training after their launcher died"
    finally:
        for pid in running(workers):
            os.kill(pid, signal.SIGKILL)
    [name] = checkpoints(out)
    assert [r["step"] for r in log(out)] == list(range(1, int(name.split("_")[1]) + 1))
    assert not os.path.exists(os.path.join(out, "run.lock"))
