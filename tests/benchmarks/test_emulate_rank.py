"""benchmarks/emulate_rank.py: one process runs train.py as rank r of a P-process run (fake process group).

It must train as that rank: accelerate, DeepSpeed ZeRO-3 and the sequence-parallel groups sized for P, and
this process holding rank r's shard of the sequence (S/P tokens at rank r's positions), every step logged.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO, TINY_ARGS, accelerate, env, log


import emulate_rank

SEQ = 256  # TINY_ARGS' --seq-length
assert TINY_ARGS[TINY_ARGS.index("--seq-length") + 1] == str(SEQ)


def emulate(out: str, world: int, rank: int, *args: str, config: str = "zero3_offload.yaml") -> list[dict]:
    """train.py under emulate_rank.py on one process launched with ``config``; return its log records."""
    res = accelerate(os.path.join("benchmarks", "emulate_rank.py"), "--world", str(world), "--rank", str(rank),
                     "--", "train.py", "--output-dir", out, *TINY_ARGS, "--max-steps", "2", "--no-save", *args,
                     config=config, timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(res.args)} failed ({res.returncode}):\n{output[-6000:]}"
    # without the wrapper's fix, garbage gradients make ZeRO-3 skip every optimizer step
    assert "OVERFLOW" not in output, output[-3000:]
    rows = log(out)
    if rank == 0:  # receives are looped back, so values stay finite (garbage would also change the GPU's
        # clocks). Not on rank > 0: the weights rank 0 loads and broadcasts never arrive there.
        assert all(math.isfinite(r["loss"]) for r in rows), rows
    return rows


@pytest.mark.parametrize("world, rank, config, backend, runs", [
    (2, 0, "zero3_offload.yaml", ["zigzag_ring"], [[0, 64], [192, 256]]),  # zigzag: chunks 0 and 3 of 4
    (2, 1, "zero3.yaml", ["zigzag_ring"], [[64, 192]]),  # chunks 1 and 2
    (4, 3, "zero3_offload.yaml", ["usp", "--ulysses-degree", "2"], [[128, 192]]),  # usp2x2: ring rank 1's first half
])
def test_emulated_rank_trains_as_that_rank_of_the_world(tmp_path, world, rank, config, backend, runs):
    rows = emulate(str(tmp_path / "run"), world, rank, "--backend", *backend, config=config)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        e = r["emulate"]
        # torch.distributed, accelerate and DeepSpeed (its ZeRO-3 partition: 1/P of the parameters) agree
        assert (e["rank"], e["world"], e["accelerate_rank"], e["accelerate_world"]) == (rank, world, rank, world)
        assert abs(e["zero3_param_fraction"] - 1 / world) < 0.01, e
        # this process trained on rank r's shard: S/P tokens at rank r's positions
        assert e["input_shape"] == [1, SEQ // world] and e["position_runs"] == runs, e
        assert r["tokens_per_s"] > 0
    assert rows[-1]["tokens"] == 2 * SEQ  # one data-parallel group: the whole sequence per step


def test_a_receive_gets_the_same_shaped_send_and_others_get_zeros():
    """The fake group leaves receive buffers as allocated; the emulated rank's ring must see real data."""
    script = """
import torch
import emulate_rank
emulate_rank.join_fake_world(1, 4)
emulate_rank.patch(1, 4)
from easy_context.attention import comm
kv = [torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4, dtype=torch.float64)]
got = comm.RingComm().start(kv).wait()
assert all(torch.equal(a, b) for a, b in zip(got, kv)), got
odd = comm.p2p([(kv[0], 2)], [(torch.full((5,), float("nan")), 0), (torch.full((2, 3, 8, 4), 7.0), 0)], None).wait()
assert torch.equal(odd[0], torch.zeros(5)) and torch.equal(odd[1], torch.zeros(2, 3, 8, 4)), odd
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=os.path.join(REPO, "benchmarks"), env=env(),
                         capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_position_runs():
    assert emulate_rank.position_runs([0, 1, 2, 6, 7, 3]) == [[0, 3], [6, 8], [3, 4]]
    assert emulate_rank.position_runs([]) == []


@pytest.mark.parametrize("flags, message", [
    (["--world", "2", "--rank", "2"], "0 <= --rank < --world"),
    (["--world", "2", "--", "eval_ppl.py"], "only train.py"),
])
def test_bad_arguments_fail_before_any_work(flags, message):
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "emulate_rank.py"), *flags],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_refuses_a_launch_of_several_processes():
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "emulate_rank.py"), "--world", "2"],
                         cwd=REPO, env=dict(env(), WORLD_SIZE="2"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--num_processes 1" in res.stderr, res.stderr


def test_bench_train_runs_rank_0_of_the_gpu_count_in_one_process():
    import bench_train

    r = bench_train.run(4, "zero3_offload", "tiny", 512, "zigzag_ring", 2, ["--seed", "3"], 300, emulate=True)
    assert r["ok"], r["tail"]
    assert "--num_processes 1 " in r["cmd"] and "emulate_rank.py --world 4 --" in r["cmd"]
    assert [x["emulate"]["world"] for x in r["records"]] == [4, 4]
    assert r["records"][0]["emulate"]["input_shape"] == [1, 512 // 4]


def test_a_refusal_on_an_emulated_rank_other_than_0_is_printed(tmp_path):
    # alone in its fake group, the emulated rank 1 is the only process that can say why the run stopped
    (tmp_path / "run" / "model").mkdir(parents=True)  # a finished run's model: a rerun is refused
    res = accelerate(os.path.join("benchmarks", "emulate_rank.py"), "--world", "2", "--rank", "1", "--",
                     "train.py", "--output-dir", str(tmp_path / "run"), *TINY_ARGS, config="ddp.yaml", timeout=300)
    assert res.returncode != 0 and "already holds a run that finished" in res.stderr, res.stderr[-3000:]
