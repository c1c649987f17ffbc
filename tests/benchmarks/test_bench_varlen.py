"""benchmarks/bench_varlen.py: seeded documents that fill the sequence, their attention work, the load-balance
table, and a small CPU run of every path (one process and an emulated rank) that writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import bench_varlen
from easy_context.attention.kernels import get_kernel
from tests.helpers.launch import REPO, env


def test_documents_fill_the_sequence_within_the_length_range():
    bounds = bench_varlen.document_bounds(4096, 64, 1024, seed=3)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 4096 and all(64 <= n <= 1024 for n in lengths[:-1])
    assert bench_varlen.document_bounds(4096, 64, 1024, seed=3) == bounds  # seeded
    one_document = [r for r in bench_varlen.work_table(bounds, [2, 4]) if r["documents"] == "one document"]
    assert all(r["max_over_mean"] == 1.0 for r in one_document if r["layout"] == "zigzag")


def test_one_call_per_document_computes_what_the_varlen_call_does():
    kern = get_kernel("cpu_flash")
    q, k, v, dout = (torch.randn(1, h, 96, 8) for h in (4, 2, 2, 4))
    bounds = bench_varlen.document_bounds(96, 4, 32, seed=1)
    results = []
    for each in (kern, bench_varlen._PerDocument(kern)):
        out, lse = each.forward_varlen(q, k, v, bounds, True, 0.35)
        results.append((out, lse, *each.backward_varlen(dout, q, k, v, out, lse, bounds, True, 0.35)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert bench_varlen.time_kernel(kern, q, k, v, dout, bounds, 0, 1, cuda=False) > 0


def test_a_small_cpu_run_of_an_emulated_rank_writes_its_json(tmp_path):
    out = tmp_path / "varlen.json"
    run = subprocess.run([sys.executable, f"{REPO}/benchmarks/bench_varlen.py", "--cpu", "--seq-len", "256",
                          "--min-doc", "8", "--max-doc", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                          "--warmup", "0", "--iters", "1", "--worlds", "2", "--emulate-world", "2", "--emulate-rank",
                          "1", "--backends", "zigzag_ring,ulysses,usp:2x1", "--json", str(out)],
                         capture_output=True, text=True, env=env(), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    lengths = torch.tensor(result["documents"])
    assert int(lengths.sum()) == 256 and result["pairs_packed"] == int((lengths * (lengths + 1) // 2).sum())
    assert [r["backend"] for r in result["rows"]] == ["zigzag_ring", "ulysses", "usp:2x1"]
    assert all(r["T_one_ms"] > 0 and r["T_packed_ms"] > 0 and r["cost_ratio"] > 0 for r in result["rows"])
