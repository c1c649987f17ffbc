"""Packed documents: attention fwd+bwd of a packed sequence against the same tokens as one document.

    python benchmarks/bench_varlen.py                                  # one GPU, 128K tokens, documents 1K-32K
    python benchmarks/bench_varlen.py --emulate-world 8 --emulate-rank 0 --backends zigzag_ring,ulysses

The sequence (``--seq-len``) is cut into documents of seeded random lengths between ``--min-doc`` and
``--max-doc`` (log-uniform; the last one takes what is left). One process times, per kernel: the causal
kernel over the whole sequence as one document (T_one), the same tokens within their documents in one varlen
call (T_packed), and in one kernel call per document (T_loop). It prints the cost ratio T_packed / T_one next
to the attention work the documents leave (unmasked query-key pairs, from ``attention_work``): the FLOPs saved.

``--emulate-world P`` plays rank ``--emulate-rank`` of a P-GPU run on one GPU (PyTorch's fake process group:
every collective and send/recv a no-op, not timed) and times each backend's fwd+bwd on that rank's shard,
packed and as one document. ``--work-only`` prints, on any machine, how the attention work of these documents
spreads over the ranks of each layout (the load balance), and exits. ``--cpu`` runs on the CPU (float32, the
CPU flash kernel): a smoke run for small sizes only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import torch
import torch.distributed as dist

from easy_context import get_backend, get_kernel, shard
from easy_context.attention.documents import Documents, attention_work
from easy_context.attention.kernels import AttentionKernel
from easy_context.attention.registry import backend_layout
from easy_context.attention.usp import new_usp_group

# fwd (QK^T, PV) + bwd (QK^T again, dV, dP, dQ, dK): 2 + 5 matmuls of 2 FLOPs per (query, key) pair and head dim
FLOPS_PER_PAIR_AND_DIM = 14


def document_bounds(seq_len: int, min_doc: int, max_doc: int, seed: int) -> tuple[int, ...]:
    """Cumulative lengths (0, ..., seq_len) of documents log-uniform in [min_doc, max_doc] (the last one is cut)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < seq_len:
        u = float(torch.rand((), generator=g))
        length = int(round(math.exp(math.log(min_doc) + u * (math.log(max_doc) - math.log(min_doc)))))
        bounds.append(min(seq_len, bounds[-1] + max(1, length)))
    return tuple(bounds)


def timed(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


class _PerDocument(AttentionKernel):
    """A kernel's documents as one call per document (the fallback of kernels without a varlen path)."""

    def __init__(self, kernel: AttentionKernel):
        self.kernel, self.name, self.native_gqa = kernel, kernel.name + "_per_document", kernel.native_gqa

    def _forward(self, q, k, v, causal, scale):
        return self.kernel._forward(q, k, v, causal, scale)

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        return self.kernel._backward(dout, q, k, v, out, lse, causal, scale)


def time_kernel(kern: AttentionKernel, q, k, v, dout, bounds, warmup: int, iters: int, cuda: bool) -> float:
    """fwd+bwd of one kernel call over the whole sequence, within documents ``bounds`` (None: one document)."""
    scale = q.shape[-1] ** -0.5

    def step():
        if bounds is None:
            out, lse = kern.forward(q, k, v, True, scale)
            kern.backward(dout, q, k, v, out, lse, True, scale)
        else:
            out, lse = kern.forward_varlen(q, k, v, bounds, True, scale)
            kern.backward_varlen(dout, q, k, v, out, lse, bounds, True, scale)
    return timed(step, warmup, iters, cuda)


def time_backend(name: str, kernel: str, q, k, v, dout, documents, rank: int, world: int, warmup: int,
                 iters: int, cuda: bool) -> float:
    """fwd+bwd of a backend on this rank's shard ("usp:UxR" for USP with its degrees), within ``documents``."""
    group, layout = None, None
    if name.startswith("usp:"):
        u, r = map(int, name[4:].split("x"))
        group, layout, name = new_usp_group(ulysses_degree=u, ring_degree=r), backend_layout(
            "usp", ulysses_degree=u, ring_degree=r), "usp"
    be = get_backend(name)
    layout = layout or be.layout
    lq, lk, lv = (shard(t, layout, rank, world, dim=2).contiguous().requires_grad_(True) for t in (q, k, v))
    ldo = shard(dout, layout, rank, world, dim=2).contiguous()
    extra = {} if documents is None else {"documents": documents}

    def step():
        out = be.attention(lq, lk, lv, causal=True, kernel=kernel, group=group, check=False, **extra)
        torch.autograd.grad(out, (lq, lk, lv), ldo)
    return timed(step, warmup, iters, cuda)


def work_table(bounds: tuple[int, ...], worlds: list[int]) -> list[dict]:
    """Per layout and world size: the attention work of the busiest rank over the mean (1.0 = balanced), for the
    documents and for the same tokens as one document."""
    rows = []
    for world in worlds:
        for layout in ("contiguous", "zigzag"):
            if bounds[-1] % (2 * world):
                continue
            for what, b in (("packed", bounds), ("one document", (0, bounds[-1]))):
                work = attention_work(b, layout, world)
                mean = sum(work) / world
                rows.append({"P": world, "layout": layout, "documents": what, "max_over_mean": max(work) / mean,
                             "min_over_mean": min(work) / mean})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--min-doc", type=int, default=1024)
    p.add_argument("--max-doc", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernels", default="cudnn,flash")
    p.add_argument("--backends", default="zigzag_ring,ring,ulysses,dist_flash",
                   help="with --emulate-world: easy_context backends (comma list; usp:UxR for USP)")
    p.add_argument("--emulate-world", type=int, default=0, metavar="P")
    p.add_argument("--emulate-rank", type=int, default=0)
    p.add_argument("--work-only", action="store_true", help="print the load balance over ranks and exit")
    p.add_argument("--worlds", default="2,4,8", help="world sizes of the load-balance table")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (float32, cpu_flash): small smoke runs only")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results to this file")
    a = p.parse_args()

    bounds = document_bounds(a.seq_len, a.min_doc, a.max_doc, a.seed)
    lengths = [y - x for x, y in zip(bounds, bounds[1:])]
    one = a.seq_len * (a.seq_len + 1) // 2
    pairs = attention_work(bounds, "contiguous", 1)[0]
    flops = FLOPS_PER_PAIR_AND_DIM * a.heads * a.head_dim
    print(f"S={a.seq_len}: {len(lengths)} documents of {min(lengths)}-{max(lengths)} tokens (seed {a.seed}); "
          f"attention work {pairs / one:.4f} of one document: {100 * (1 - pairs / one):.1f}% of the attention FLOPs "
          f"saved ({flops * pairs / 1e12:.2f} vs {flops * one / 1e12:.2f} TFLOP fwd+bwd)", flush=True)
    result = {"S": a.seq_len, "documents": lengths, "pairs_packed": pairs, "pairs_one_document": one,
              "work_balance": work_table(bounds, [int(w) for w in a.worlds.split(",")]), "rows": []}
    for row in result["work_balance"]:
        print(f"  P={row['P']} {row['layout']:10s} {row['documents']:12s} busiest rank {row['max_over_mean']:.3f} "
              f"x the mean, idlest {row['min_over_mean']:.3f}")
    if a.work_only:
        return
    cuda = not a.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_varlen: needs a CUDA GPU (--cpu runs a small smoke run on the CPU, --work-only prints "
                         "the load balance)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    kernels = a.kernels.split(",") if cuda else ["cpu_flash"]
    if a.emulate_world:
        if not 0 <= a.emulate_rank < a.emulate_world:
            p.error(f"--emulate-rank must be in [0, {a.emulate_world})")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=a.emulate_rank, world_size=a.emulate_world)
    g = torch.Generator(device=device).manual_seed(a.seed)
    q, dout = (torch.randn(1, a.heads, a.seq_len, a.head_dim, device=device, dtype=dtype, generator=g) for _ in "qo")
    k, v = (torch.randn(1, a.kv_heads, a.seq_len, a.head_dim, device=device, dtype=dtype, generator=g) for _ in "kv")
    docs = Documents((bounds,))
    for kernel in kernels:
        kern = get_kernel(kernel)
        if a.emulate_world:
            rank, world = a.emulate_rank, a.emulate_world
            for be in a.backends.split(","):
                t_one = time_backend(be, kernel, q, k, v, dout, None, rank, world, a.warmup, a.iters, cuda)
                t_packed = time_backend(be, kernel, q, k, v, dout, docs, rank, world, a.warmup, a.iters, cuda)
                row = {"kernel": kernel, "backend": be, "P": world, "rank": rank, "T_one_ms": t_one,
                       "T_packed_ms": t_packed, "cost_ratio": t_packed / t_one}
                result["rows"].append(row)
                print(f"{kernel:9s} {be:12s} rank {rank} of {world}: one document {t_one:9.2f} ms, packed "
                      f"{t_packed:9.2f} ms, cost ratio {t_packed / t_one:.3f}", flush=True)
        else:
            t_one = time_kernel(kern, q, k, v, dout, None, a.warmup, a.iters, cuda)
            t_packed = time_kernel(kern, q, k, v, dout, bounds, a.warmup, a.iters, cuda)
            t_loop = time_kernel(_PerDocument(kern), q, k, v, dout, bounds, a.warmup, a.iters, cuda)
            row = {"kernel": kernel, "P": 1, "T_one_ms": t_one, "T_packed_ms": t_packed, "T_loop_ms": t_loop,
                   "cost_ratio": t_packed / t_one, "work_ratio": pairs / one,
                   "tflops_one": flops * one / t_one / 1e9, "tflops_packed": flops * pairs / t_packed / 1e9}
            result["rows"].append(row)
            print(f"{kernel:9s} one document {t_one:9.2f} ms ({row['tflops_one']:.0f} TFLOP/s), packed "
                  f"{t_packed:9.2f} ms ({row['tflops_packed']:.0f} TFLOP/s), one call per document {t_loop:9.2f} ms: "
                  f"cost ratio {t_packed / t_one:.3f} for work ratio {pairs / one:.3f}", flush=True)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    emulated = f", emulating rank {a.emulate_rank} of {a.emulate_world} (no communication)" if a.emulate_world else ""
    print(f"device: {where}{emulated}, torch {torch.__version__}, {datetime.date.today()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.emulate_world:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
