"""launch.py: the per-step memory figures train.py logs; stop requests; decisions taken by the main process."""

from __future__ import annotations

import os

from easy_context.train import launch

GIB = 2 ** 30


def test_cached_memory_is_split_into_the_compute_streams_pool_and_the_others():
    segments = [{"stream": 0, "total_size": 4 * GIB, "allocated_size": 3 * GIB},
                {"stream": 0, "total_size": 2 * GIB, "allocated_size": 0},
                {"stream": 7, "total_size": 5 * GIB, "allocated_size": GIB}]  # e.g. a communication stream
    assert launch.cached_by_stream(segments, compute_stream=0) == (3.0, 4.0)
    assert launch.cached_by_stream(segments, compute_stream=7) == (4.0, 3.0)


def test_memory_stats_report_every_field_on_a_machine_without_cuda():
    stats = launch.memory_stats()
    assert {"peak_gpu_gib", "reserved_gpu_gib", "split_free_gpu_gib", "alloc_retries", "cached_gpu_gib_compute",
            "cached_gpu_gib_other_streams", "host_rss_gib", "host_peak_gib"} <= stats.keys()
    assert stats["cached_gpu_gib_compute"] == stats["cached_gpu_gib_other_streams"] == 0.0
    assert 0 < stats["host_rss_gib"] <= stats["host_peak_gib"] + 1e-3


def test_sigint_and_sigterm_ask_the_loop_to_stop_instead_of_killing_it():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    stop = launch.StopRequests()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the loop decides when to stop
        assert stop.requested() and stop.reason == "SIGTERM" and stop.code == 128 + signal.SIGTERM
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_dead_launcher_asks_the_loop_to_stop(monkeypatch):
    stop = launch.StopRequests(parent=os.getppid())
    try:
        assert not stop.requested()
        stop.parent = os.getppid() + 1  # as after the launcher died and this process was re-parented
        assert stop.requested() and "launcher" in stop.reason and stop.code != 0
    finally:
        stop.close()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert launch.launcher_pid() is None  # a plain process (nohup python train.py) outlives its shell
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launch.launcher_pid() == os.getppid()


def _decide_worker(rank, world, calls):
    import pytest

    def refuse():
        open(calls, "a").write(f"{rank}\n")
        raise SystemExit("refused by the main process")

    with pytest.raises(SystemExit, match="refused by the main process"):
        launch.main_decides(refuse, main=rank == 0)
    assert launch.main_decides(lambda: f"chosen on {rank}", main=rank == 0) == "chosen on 0"


def test_the_main_process_decides_for_every_rank(tmp_path):
    from tests.helpers.distributed import run_distributed

    calls = str(tmp_path / "calls")
    run_distributed(_decide_worker, 2, calls)
    assert open(calls).read() == "0\n"
