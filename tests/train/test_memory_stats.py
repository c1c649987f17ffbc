"""memory_stats.py: the per-step memory figures train.py logs."""

from __future__ import annotations

from easy_context.train import memory_stats

GIB = 2 ** 30


def test_cached_memory_is_split_into_the_compute_streams_pool_and_the_others():
    segments = [{"stream": 0, "total_size": 4 * GIB, "allocated_size": 3 * GIB},
                {"stream": 0, "total_size": 2 * GIB, "allocated_size": 0},
                {"stream": 7, "total_size": 5 * GIB, "allocated_size": GIB}]  # e.g. a communication stream
    assert memory_stats.cached_by_stream(segments, compute_stream=0) == (3.0, 4.0)
    assert memory_stats.cached_by_stream(segments, compute_stream=7) == (4.0, 3.0)


def test_pinned_host_memory_is_what_the_pinned_allocator_holds_cached_blocks_included():
    # older torch names the blocks it holds reserved_bytes (allocated_bytes: those handed out); newer torch
    # names them allocated_bytes (active_bytes: those handed out)
    older = {"allocated_bytes.current": GIB, "allocated_bytes.peak": 2 * GIB,
             "reserved_bytes.current": 4 * GIB, "reserved_bytes.peak": 6 * GIB}
    newer = {"allocated_bytes.current": 4 * GIB, "allocated_bytes.peak": 6 * GIB,
             "active_bytes.current": GIB, "active_bytes.peak": 2 * GIB}
    assert memory_stats.pinned_host_gib(older) == memory_stats.pinned_host_gib(newer) == (4.0, 6.0)
    assert memory_stats.pinned_host_gib({}) == (0.0, 0.0)  # no CUDA: nothing pinned


def test_memory_stats_report_every_field_on_a_machine_without_cuda():
    stats = memory_stats.memory_stats()
    assert {"peak_gpu_gib", "reserved_gpu_gib", "split_free_gpu_gib", "alloc_retries", "cached_gpu_gib_compute",
            "cached_gpu_gib_other_streams", "host_rss_gib", "host_peak_gib", "pinned_host_gib",
            "pinned_host_peak_gib"} <= stats.keys()
    assert stats["cached_gpu_gib_compute"] == stats["cached_gpu_gib_other_streams"] == 0.0
    assert stats["pinned_host_gib"] == stats["pinned_host_peak_gib"] == 0.0
    assert 0 < stats["host_rss_gib"] <= stats["host_peak_gib"] + 1e-3
