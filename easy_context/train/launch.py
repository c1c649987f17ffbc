"""Join the process group a launcher (accelerate launch, torchrun) set up: NCCL on GPUs, gloo on CPU; stop
requests (signals, a dead launcher) for the training loop; decisions the main process takes for every rank."""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .run_lock import release_held


@dataclass(frozen=True)
class Launch:
    """This process's place: global rank, world size, local rank, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 120.0, cpu: bool | None = None) -> Launch:
    """Init torch.distributed from the launcher's environment (no-op for a single plain process).

    ``cpu``: force gloo on CPU (default: CPU only when CUDA is unavailable). The long default timeout lets
    a slow ZeRO-offload step or a 1M-token eval pass finish without the collective timing out.
    """
    use_cpu = not torch.cuda.is_available() if cpu is None else cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if use_cpu else torch.device("cuda", local_rank)
    if not use_cpu:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if use_cpu else "nccl", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({} if use_cpu else {"device_id": device}))
    return Launch(rank, world, local_rank, device)


def host_rss_gib() -> float:
    """This process's resident host memory in GiB (0.0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return 0.0


def cached_by_stream(segments: list[dict], compute_stream: int) -> tuple[float, float]:
    """GiB the CUDA allocator holds reserved but unallocated in the compute stream's pool and in all other
    streams' pools (a stream's cached blocks serve only that stream), from ``torch.cuda.memory_snapshot()``."""
    cached = [0, 0]
    for seg in segments:
        cached[seg["stream"] != compute_stream] += seg["total_size"] - seg["allocated_size"]
    return cached[0] / 2**30, cached[1] / 2**30


def memory_stats() -> dict[str, float]:
    """GiB: the CUDA allocator's peak allocated and peak reserved (0.0 without CUDA), what it holds cached now
    in the compute stream's pool and in other streams', this process's host memory now (``host_rss_gib``,
    pinned buffers included) and its peak since start (``host_peak_gib``)."""
    import resource

    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    cached = (cached_by_stream(torch.cuda.memory_snapshot(), torch.cuda.current_stream().cuda_stream)
              if torch.cuda.is_available() else (0.0, 0.0))
    return {"peak_gpu_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,  # = max_memory_allocated()
            "reserved_gpu_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,  # = max_memory_reserved()
            # fragmentation: cached but unusable pieces of split blocks at their peak, and allocator retries
            "split_free_gpu_gib": stats.get("inactive_split_bytes.all.peak", 0) / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0),
            "cached_gpu_gib_compute": cached[0], "cached_gpu_gib_other_streams": cached[1],
            "host_rss_gib": host_rss_gib(),
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB


T = TypeVar("T")


def main_decides(fn: Callable[[], T], main: bool) -> T:
    """Collective: call ``fn`` on the main process only; every rank returns its result or exits with its
    SystemExit (another exception on the main process reaches the others as a SystemExit naming it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "fake":
        return fn()  # one process (a fake group: benchmarks/emulate_rank.py emulates one rank, alone)
    box: list = [None]
    error = None
    if main:
        try:
            box[0] = ("value", fn())
        except SystemExit as e:
            box[0] = ("exit", e.code)
        except Exception as e:
            error, box[0] = e, ("exit", f"the main process failed: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "exit":
        raise SystemExit(value)
    return value


def launcher_pid() -> int | None:
    """The parent's pid when a launcher started this process (torchrun, accelerate launch), else None (a plain
    process may outlive its parent on purpose: ``nohup python train.py &``)."""
    launched = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU"))
    return os.getppid() if launched else None


class StopRequests:
    """SIGINT and SIGTERM (and, given the ``parent`` pid, that process's death: this process re-parented) ask
    the training loop to stop at its next step instead of ending the process; ``close`` restores the previous
    handlers. ``reason`` names the first request and ``code`` is the exit status to end with (128 + signal)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, parent: int | None = None):
        self.parent, self.reason, self.code = parent, None, 0
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.reason is None:
            self.reason, self.code = signal.Signals(signum).name, 128 + signum

    def requested(self) -> bool:
        """True once a signal came or the watched parent is gone."""
        if self.reason is None and self.parent is not None and os.getppid() != self.parent:
            self.reason, self.code = f"the death of its launcher (pid {self.parent})", 128 + signal.SIGHUP
        return self.reason is not None

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def finish(code: int = 0) -> None:
    """End a script: release this process's output-directory lock, close the process group and exit with
    ``code`` without running C++ destructors.

    Gloo sometimes aborts in a destructor at interpreter exit ("terminate called without an active
    exception") after every collective has completed, which turns a finished run into a failure. Call
    this last, after all output is written; a plain single process returns (``code`` 0) or exits.
    """
    release_held()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
