"""benchmarks/bench_memory.py: a failed length says why it failed, a cut-off sweep keeps its rows, and earlier
runs (real and emulated, failures included) merge into one table and one plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.launch import REPO


import bench_memory
from bench_train import error_lines, error_tail

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB."
# what `accelerate launch` prints after its child died: long enough to push the child's error out of a tail
LAUNCHER = "Traceback (most recent call last):\n" + '  File "accelerate/commands/launch.py", line 1, in x\n' * 60 + (
    "subprocess.CalledProcessError: Command '['python', 'train.py']' returned non-zero exit status 1.\n")


def test_an_out_of_memory_buried_under_the_launchers_traceback_is_still_named():
    output = "step 0\n" + OOM + "\n" + LAUNCHER
    assert bench_memory.failure(output[-2500:]) == "error"  # what a plain tail said
    tail = error_tail(output)
    assert bench_memory.failure(tail) == "OOM"
    assert tail.endswith(LAUNCHER[-2500:])


def test_a_childs_rank_prefixed_error_is_named_ahead_of_the_launchers():
    # torchrun prefixes a child's lines with its rank; the launcher's ChildFailedError names no cause
    child = "[rank0]: ValueError: --offload-activations: 32 layer inputs ... need 128.0 GiB of host memory"
    output = child + "\n" + "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" * 2 + LAUNCHER
    assert error_lines(output) == [child, LAUNCHER.splitlines()[-1]]


def test_a_run_without_exception_lines_keeps_its_plain_tail():
    assert error_tail("x" * 3000 + "Killed\n") == ("x" * 3000 + "Killed\n")[-2500:]
    assert bench_memory.failure(error_tail("x" * 3000 + "Killed\n")) == "killed (host memory?)"


def test_save_replaces_the_file_whole(tmp_path):
    path = str(tmp_path / "curve.json")
    bench_memory.save(path, {"rows": [1]})
    bench_memory.save(path, {"rows": [1, 2]})
    assert json.load(open(path)) == {"rows": [1, 2]}
    assert os.listdir(tmp_path) == ["curve.json"]


def row(option: str, seq: int, peak: float | None, **extra) -> dict:
    if peak is None:
        return {"option": option, "seq": seq, "ok": False, "failure": "OOM", **extra}
    return {"option": option, "seq": seq, "ok": True, "step_s": seq / 4096, "peak_gpu_gib": peak,
            "reserved_gpu_gib": peak + 8, "host_rss_gib": 2.0, "host_peak_gib": 9.0, **extra}


def test_from_json_merges_real_and_emulated_runs_with_their_failures(tmp_path):
    emulated = {"model": "shape:llama3-8b", "gpus": 2, "config": "zero3", "emulated": True, "gpu_gib": 140.4,
                "rows": [row("checkpointing", 131072, 68.1, emulated=True), row("checkpointing", 524288, None,
                                                                                  emulated=True)]}
    real = {"model": "shape:llama3-8b", "gpus": 2, "config": "zero3",  # written before runs recorded "emulated"
            "rows": [row("tiled+offload", 524288, 67.2)]}
    files = []
    for name, content in (("emulated.json", emulated), ("real.json", real)):
        files.append(str(tmp_path / name))
        bench_memory.save(files[-1], content)
    png = tmp_path / "curve.png"
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_memory.py"), "--from-json",
                          ",".join(files), "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| checkpointing | 131072 | 32.0 | 68.1 (76.1) |" in res.stdout
    assert "| checkpointing | 524288 | | | | OOM |" in res.stdout
    assert "| tiled+offload | 524288 | 128.0 | 67.2 (75.2) |" in res.stdout
    assert png.stat().st_size > 10_000


def test_the_title_says_which_runs_were_emulated():
    assert "emulated" in bench_memory.title("m", 2, True)
    assert "emulated" not in bench_memory.title("m", 2, False)
    assert "(real) and rank 0 of 2 emulated" in bench_memory.title("m", 2, None)


def test_a_later_measurement_of_the_same_point_replaces_the_earlier_one():
    first = [{"option": "a", "seq": 1, "emulated": True, "failure": "error"},
             {"option": "a", "seq": 2, "emulated": True, "ok": True}]
    rerun = {"option": "a", "seq": 1, "emulated": True, "failure": "OOM"}
    real = {"option": "a", "seq": 1, "emulated": False, "ok": True}  # a real run is another point
    assert bench_memory.latest_rows(first + [rerun, real]) == [rerun, first[1], real]
