"""Causal attention fwd+bwd: one GPU on the full sequence vs sequence-parallel backends on P GPUs.

    torchrun --nproc_per_node=2 benchmarks/bench_attention.py --seqlens 32768,131072,262144
    torchrun --nproc_per_node=1 benchmarks/bench_attention.py --heads 32 --kv-heads 8 --head-dim 64 --seqlens 131072 \
        --backends zigzag_ring --no-torch-cp      # the kernels alone on the Llama-3.2-1B shape's attention

For each kernel (cuDNN, flash) and length S it times, in the same run: the kernel alone on the full
sequence on one GPU (T1), each of our backends on P GPUs, and PyTorch's native ``context_parallel``
(head-tail load balancing on, same SDPA kernel forced). Efficiency = T1 / (P * T_parallel).
It also prints the kernel-only time of the zigzag schedule on one rank (no communication, no merge),
so a shortfall can be split into "smaller kernel calls" and "everything else".

    python benchmarks/bench_attention.py --emulate-world 8 --seqlens 524288 --skip-single   # one GPU

``--emulate-world P`` runs rank ``--emulate-rank`` of a P-GPU run on one GPU, every collective and send/recv
a no-op (PyTorch's fake process group): the rank's own kernels, merges and copies, without communication
time. torch's context_parallel is skipped there. ``--skip-single`` skips T1 (and so the efficiencies).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from easy_context import get_backend, get_kernel, shard
from easy_context.attention.registry import backend_layout
from easy_context.attention.usp import new_usp_group
from easy_context.attention.zigzag import zigzag_schedule


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs (CUDA events, all ranks synced)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def make_inputs(b, h, s, d, h_kv=None, seed=0):
    """q, k, v, dout [B, H, S, D] in bf16; k and v with ``h_kv`` heads (GQA; default: h)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    heads = (h, h_kv or h, h_kv or h, h)
    return [torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for n in heads]


def time_single(kernel_name, q, k, v, dout, warmup, iters):
    """Kernel fwd+bwd on the full sequence (one GPU)."""
    kern = get_kernel(kernel_name)
    scale = q.shape[-1] ** -0.5

    def step():
        out, lse = kern.forward(q, k, v, True, scale)
        kern.backward(dout, q, k, v, out, lse, True, scale)
    return cuda_time(step, warmup, iters)


def time_backend(name, kernel_name, q, k, v, dout, rank, world, warmup, iters):
    """fwd+bwd of an easy_context backend on this rank's shard; "usp:UxR" names USP with its degrees."""
    group, layout = None, None
    if name.startswith("usp:"):
        u, r = map(int, name[4:].split("x"))
        group = new_usp_group(ulysses_degree=u, ring_degree=r)
        layout = backend_layout("usp", ulysses_degree=u, ring_degree=r)
        name = "usp"
    be = get_backend(name)
    layout = layout or be.layout
    lq, lk, lv, ldo = (shard(t, layout, rank, world, dim=2).contiguous() for t in (q, k, v, dout))
    lq.requires_grad_(True), lk.requires_grad_(True), lv.requires_grad_(True)

    def step():
        out = be.attention(lq, lk, lv, causal=True, kernel=kernel_name, group=group)
        out.backward(ldo)
    return cuda_time(step, warmup, iters)


def time_zigzag_kernels_only(kernel_name, q, k, v, dout, rank, world, warmup, iters):
    """The kernel calls of the zigzag schedule on this rank, without communication or merging."""
    kern = get_kernel(kernel_name)
    scale = q.shape[-1] ** -0.5
    lq, lk, lv, ldo = (shard(t, "zigzag", rank, world, dim=2).contiguous() for t in (q, k, v, dout))
    seq = lq.shape[2]

    def step():
        for s in range(world):
            for blk in zigzag_schedule(s, rank, world, seq, True):
                bq, bk, bv, bdo = lq[:, :, blk.q], lk[:, :, blk.k], lv[:, :, blk.k], ldo[:, :, blk.q]
                out, lse = kern.forward(bq, bk, bv, blk.causal, scale)
                kern.backward(bdo, bq, bk, bv, out, lse, blk.causal, scale)
    return cuda_time(step, warmup, iters)


def _cp_options():
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    except ImportError:  # older torch layout
        from torch.distributed.tensor.experimental._attention import _cp_options
    return _cp_options


def time_torch_cp(kernel_name, q, k, v, dout, world, warmup, iters):
    """PyTorch's native context_parallel (head-tail load balancing on) with the same SDPA kernel forced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel_name]
    _cp_options().enable_load_balance = True
    mesh = init_device_mesh("cuda", (world,))
    cq, ck, cv, cdo = (t.clone() for t in (q, k, v, dout))
    bufs = [cq, ck, cv, cdo]
    with sdpa_kernel(sdpa), context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4,
                                             no_restore_buffers=set(bufs)):
        for t in (cq, ck, cv):  # sharded in place on entry, which a tensor requiring grad refuses
            t.requires_grad_(True)

        def step():
            out = torch.nn.functional.scaled_dot_product_attention(cq, ck, cv, is_causal=True,
                                                                   enable_gqa=cq.shape[1] != ck.shape[1])
            out.backward(cdo)
        return cuda_time(step, warmup, iters)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="32768,131072,262144")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads (GQA; default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernels", default="cudnn,flash")
    p.add_argument("--backends", default="zigzag_ring,ring,ulysses,usp:2x1,usp:1x2,dist_flash",
                   help="easy_context backends (comma list; usp:UxR for USP with its degrees)")
    p.add_argument("--no-torch-cp", action="store_true", help="skip PyTorch's context_parallel")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="write all rows to this file (rank 0)")
    p.add_argument("--emulate-world", type=int, default=0, metavar="P",
                   help="one process on one GPU plays one rank of P; communication is a no-op (not timed)")
    p.add_argument("--emulate-rank", type=int, default=0)
    p.add_argument("--skip-single", action="store_true", help="do not time the kernel on the full sequence")
    a = p.parse_args()
    if a.kv_heads is not None and (a.kv_heads < 1 or a.heads % a.kv_heads):
        p.error(f"--kv-heads must divide --heads ({a.heads}); got {a.kv_heads}")

    if a.emulate_world:
        if not 0 <= a.emulate_rank < a.emulate_world:
            p.error(f"--emulate-rank must be in [0, {a.emulate_world})")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=a.emulate_rank, world_size=a.emulate_world)
        a.no_torch_cp = True
    else:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(0 if a.emulate_world else int(os.environ.get("LOCAL_RANK", rank)))
    nan = float("nan")
    rows = []
    for kernel_name in a.kernels.split(","):
        for s in map(int, a.seqlens.split(",")):
            q, k, v, dout = make_inputs(1, a.heads, s, a.head_dim, a.kv_heads)
            it = max(2, a.iters if s <= 131072 else a.iters // 2)
            t1 = nan if a.skip_single else time_single(kernel_name, q, k, v, dout, a.warmup, it)
            res = {"kernel": kernel_name, "S": s, "P": world, "T1_ms": t1}
            for be in a.backends.split(","):
                res[be] = time_backend(be, kernel_name, q, k, v, dout, rank, world, a.warmup, it)
            res["zigzag_kernels_only"] = time_zigzag_kernels_only(kernel_name, q, k, v, dout, rank, world,
                                                                  a.warmup, it)
            if not a.no_torch_cp:
                try:
                    res["torch_cp"] = time_torch_cp(kernel_name, q, k, v, dout, world, a.warmup, it)
                except Exception as e:  # a prototype API: report, keep the rest of the table
                    print(f"rank {rank}: torch context_parallel failed: {type(e).__name__}: {e}", flush=True)
                    res["torch_cp"] = nan
            # the slowest rank sets the pace of a parallel step
            for key in res:
                if key not in ("kernel", "S", "P"):
                    t = torch.tensor([res[key]], device="cuda")
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    res[key] = t.item()
            rows.append(res)
            if rank == (a.emulate_rank if a.emulate_world else 0):
                eff = {k2: res["T1_ms"] / (world * v2) for k2, v2 in res.items()
                       if k2 not in ("kernel", "S", "P", "T1_ms")}
                print(f"{kernel_name:6s} S={s:7d} T1={t1:9.1f} ms  " +
                      "  ".join(f"{k2}={res[k2]:8.1f} ms (eff {e:.3f})" for k2, e in eff.items()), flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    if rank == (a.emulate_rank if a.emulate_world else 0):
        print("\n| kernel | S | T1 (1 GPU) ms | " + " | ".join(
            f"{k2} ms (eff)" for k2 in rows[0] if k2 not in ("kernel", "S", "P", "T1_ms")) + " |")
        for r in rows:
            print(f"| {r['kernel']} | {r['S']} | {r['T1_ms']:.1f} | " + " | ".join(
                f"{r[k2]:.1f} ({r['T1_ms'] / (world * r[k2]):.3f})" for k2 in r
                if k2 not in ("kernel", "S", "P", "T1_ms")) + " |")
        gpus = f"x1 emulating rank {rank} of {world} (no communication)" if a.emulate_world else f"x{world}"
        print(f"device: {torch.cuda.get_device_name()} {gpus}, torch {torch.__version__}, {datetime.date.today()}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
