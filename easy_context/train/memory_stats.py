"""The memory figures every training step logs: the CUDA allocator's peaks and caches, host memory."""

from __future__ import annotations

import os
import resource

import torch


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


def pinned_host_gib(stats: dict) -> tuple[float, float]:
    """GiB of pinned host memory the pinned allocator holds (handed out and cached), now and at its peak, from
    ``torch.cuda.memory.host_memory_stats()``: freed pinned blocks stay cached, not returned to the system."""
    key = "reserved_bytes" if "reserved_bytes.current" in stats else "allocated_bytes"  # older torch: reserved
    return stats.get(f"{key}.current", 0) / 2**30, stats.get(f"{key}.peak", 0) / 2**30


def memory_stats() -> dict[str, float]:
    """GiB: the CUDA allocator's peak allocated and peak reserved (0.0 without CUDA), what it holds cached now
    in the compute stream's pool and in other streams', this process's host memory now (``host_rss_gib``,
    pinned buffers included) and its peak since start (``host_peak_gib``), and the pinned allocator's share
    (``pinned_host_gib``)."""
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    cached = (cached_by_stream(torch.cuda.memory_snapshot(), torch.cuda.current_stream().cuda_stream)
              if torch.cuda.is_available() else (0.0, 0.0))
    host_stats = getattr(torch.cuda.memory, "host_memory_stats", None)  # not in every torch >= 2.6
    pinned = pinned_host_gib(host_stats() if host_stats and torch.cuda.is_available() else {})
    return {"peak_gpu_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,  # = max_memory_allocated()
            "reserved_gpu_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,  # = max_memory_reserved()
            # fragmentation: cached but unusable pieces of split blocks at their peak, and allocator retries
            "split_free_gpu_gib": stats.get("inactive_split_bytes.all.peak", 0) / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0),
            "cached_gpu_gib_compute": cached[0], "cached_gpu_gib_other_streams": cached[1],
            "host_rss_gib": host_rss_gib(),
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss: KiB
            "pinned_host_gib": pinned[0], "pinned_host_peak_gib": pinned[1]}
