"""Case loops shared by the backend tests: every (causal, shape, kernel) case against full attention."""

from __future__ import annotations

import itertools

import torch

from tests.helpers.reference import check_against_full

TOL = {
    torch.float64: dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-10),
    torch.float32: dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 2e-5),
}
# fused CPU flash kernel in float32 and the float64 reference kernel (exact to 1e-10)
CPU_KERNELS = [("cpu_flash", torch.float32), ("reference", torch.float64)]
GPU_TOL = {"out": 2e-2, "lse": 1e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2}
GPU_SHAPES = [(8, 8, 128), (8, 2, 64)]


def check_cases_cpu(attn, rank: int, world: int, layout: str, shapes: list[tuple[int, int, int]], seed: int,
                    causals=(True, False), kernels=CPU_KERNELS, chunk: int = 5, **kwargs) -> None:
    """check_against_full for every (causal, (heads, kv_heads, head_dim), (kernel, dtype)) case on CPU."""
    cases = itertools.product(causals, shapes, kernels)
    for i, (causal, (h, hkv, d), (kernel, dtype)) in enumerate(cases):
        check_against_full(attn, rank, world, layout, causal=causal, heads=h, kv_heads=hkv, head_dim=d,
                           chunk=chunk, dtype=dtype, device="cpu", seed=seed + i, tol=TOL[dtype], kernel=kernel,
                           **kwargs)


def check_cases_gpu(attn, rank: int, world: int, layout: str, seed: int, label: str, causals=(True, False),
                    **kwargs) -> None:
    """bf16 on CUDA with every available fused kernel, loose tolerances; prints the errors on rank 0
    and fails after trying every case."""
    from easy_context.attention.kernels import available_kernels
    probe = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    failures = []
    for kernel in [k for k in available_kernels(probe, probe) if k != "reference"]:
        for causal, (h, hkv, d) in itertools.product(causals, GPU_SHAPES):
            try:
                errs = check_against_full(attn, rank, world, layout, causal=causal, heads=h, kv_heads=hkv,
                                          head_dim=d, chunk=512, batch=1, dtype=torch.bfloat16, device="cuda",
                                          seed=seed, tol=GPU_TOL, kernel=kernel, **kwargs)
            except AssertionError as e:  # report every kernel and case, then fail
                failures.append(f"{label} {kernel}: {e}")
                continue
            if rank == 0:
                print(f"GPU {label:12s} {kernel:10s} causal={causal!s:5s} H={h} Hkv={hkv} D={d} " +
                      " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    assert not failures, "\n".join(failures)


def gpu_worker(rank: int, world: int, seed: int, attn, layout: str, label: str) -> None:
    """``run_distributed`` entry for a backend that needs no group object: ``check_cases_gpu`` on WORLD."""
    check_cases_gpu(attn, rank, world, layout, seed, label)


def check_single_process(attn, layout: str, seed: int, chunk: int = 6, **kwargs) -> None:
    """Without any process group a backend is plain attention, exact in float64."""
    errs = check_against_full(attn, 0, 1, layout, causal=True, heads=4, kv_heads=2, head_dim=16, chunk=chunk,
                              dtype=torch.float64, device="cpu", seed=seed, tol=TOL[torch.float64], **kwargs)
    assert max(errs.values()) < 1e-10, errs


def mismatched_length_inputs(rank: int, heads: int = 4, kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    """q, k, v whose local length differs on rank 0: every backend must raise, not hang."""
    s = 8 if rank == 0 else 16
    q = torch.randn(1, heads, s, 16)
    kv = torch.randn(1, kv_heads, s, 16)
    return q, kv, kv
