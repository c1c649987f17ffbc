"""Ring and zigzag ring attention equal full attention on the unsharded sequence (out, lse, dq, dk, dv)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed
from easy_context import ring_attention, zigzag_ring_attention
from easy_context.attention.kernels import ReferenceKernel
from tests.helpers.reference import check_against_full

BACKENDS = {"contiguous": ring_attention, "zigzag": zigzag_ring_attention}
TOL = {
    torch.float64: dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-10),
    torch.float32: dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 2e-5),
}
# (heads, kv_heads, head_dim): MHA, GQA, MQA; two head dims.
SHAPES = [(4, 4, 16), (4, 2, 32), (6, 1, 16)]


def _exactness_worker(rank, world, seed, kernels):
    cases = itertools.product(BACKENDS.items(), (True, False), SHAPES, kernels)
    for i, ((layout, attn), causal, (h, hkv, d), (kernel, dtype)) in enumerate(cases):
        check_against_full(attn, rank, world, layout, causal=causal, heads=h, kv_heads=hkv, head_dim=d,
                           chunk=5, dtype=dtype, device="cpu", seed=seed + i, tol=TOL[dtype], kernel=kernel)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_full_attention_cpu(world, seed):
    # fused CPU flash kernel in float32 and the float64 reference kernel (exact to 1e-10)
    run_distributed(_exactness_worker, world, seed, [("cpu_flash", torch.float32), ("reference", torch.float64)])


def _head_group_worker(rank, world, seed):
    from easy_context.attention import head_groups
    head_groups.MAX_CALL_ELEMENTS = 1  # every ring runs once per kv head (the 1M-token configuration, in small)
    for i, ((layout, attn), bshd, (h, hkv, d)) in enumerate(itertools.product(BACKENDS.items(), (False, True),
                                                                                SHAPES)):
        check_against_full(attn, rank, world, layout, causal=True, heads=h, kv_heads=hkv, head_dim=d, chunk=4,
                           dtype=torch.float64, device="cpu", seed=seed + i, tol=TOL[torch.float64], bshd=bshd)


@pytest.mark.parametrize("world", [2, 3])
def test_one_ring_per_head_group_matches_full_attention(world, seed):
    run_distributed(_head_group_worker, world, seed)


def _subgroup_worker(rank, world, seed):
    # Two independent rings of 2 ranks each ({0, 1} and {2, 3}), as data x sequence parallelism will use.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    for layout, attn in BACKENDS.items():
        check_against_full(attn, rank % 2, 2, layout, causal=True, heads=4, kv_heads=2, head_dim=16, chunk=4,
                           dtype=torch.float64, device="cpu", seed=seed + rank // 2, tol=TOL[torch.float64],
                           group=group)


def test_subgroups_run_independent_rings(seed):
    run_distributed(_subgroup_worker, 4, seed)


def _mismatch_worker(rank, world):
    s = 8 if rank == 0 else 12  # rank 1 got a different local length
    q = torch.randn(1, 2, s, 16)
    for attn in BACKENDS.values():
        with pytest.raises(ValueError, match="same shapes"):
            attn(q, q, q)


def test_mismatched_shapes_across_ranks_raise_not_hang():
    run_distributed(_mismatch_worker, 2, timeout_s=30)


def _odd_length_on_one_rank_worker(rank, world, seed):
    # Rank 1 holds an odd local length, its neighbours an even one: the odd rank fails a local check, and
    # every rank must raise with it instead of waiting alone in the cross-rank check (a hang until timeout).
    q = torch.randn(1, 2, 7 if rank == 1 else 8, 16)
    with pytest.raises(ValueError, match="must be even; got 7"):
        zigzag_ring_attention(q, q, q)
    # the group is still in step: a correct call afterwards is exact
    check_against_full(zigzag_ring_attention, rank, world, "zigzag", causal=True, heads=2, kv_heads=1, head_dim=8,
                       chunk=3, dtype=torch.float64, device="cpu", seed=seed, tol=TOL[torch.float64])


def test_zigzag_odd_length_on_some_ranks_raises_on_every_rank(seed):
    run_distributed(_odd_length_on_one_rank_worker, 3, seed, timeout_s=20)


def _rank_local_error_worker(rank, world, seed):
    # The shapes agree across ranks, but the last rank's call fails a local check: every rank raises it.
    bad = rank == world - 1
    q = torch.randn(1, 2, 8, 16)
    for attn in BACKENDS.values():
        with pytest.raises(ValueError, match="dtypes differ"):
            attn(q, q, q.double() if bad else q)
        with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
            attn(q, q, q, kernel="nope" if bad else None)
        with pytest.raises(ValueError, match=r"must be \[batch, heads, seq, head_dim\]"):
            attn(q[0] if bad else q, q, q)
        with pytest.raises(ValueError, match="causal attention needs equal local q and k lengths"):
            attn(q, q[:, :, :4] if bad else q, q[:, :, :4] if bad else q)
        check_against_full(attn, rank, world, "zigzag" if attn is zigzag_ring_attention else "contiguous",
                           causal=True, heads=2, kv_heads=1, head_dim=8, chunk=3, dtype=torch.float64,
                           device="cpu", seed=seed, tol=TOL[torch.float64])


def test_rank_local_errors_raise_on_every_rank(seed):
    run_distributed(_rank_local_error_worker, 2, seed, timeout_s=20)


def test_bad_local_inputs_raise():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="not supported on CPU"):
        ring_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ring_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="must be even"):
        zigzag_ring_attention(q[:, :, :7], q[:, :, :7], q[:, :, :7])
    with pytest.raises(ValueError, match="unknown attention kernel"):
        ring_attention(q, q, q, kernel="nope")
    with pytest.raises(ValueError, match="cannot run"):
        ring_attention(q, q, q, kernel="cudnn")


def test_single_process_without_distributed_is_plain_attention(seed):
    # No process group at all: world size 1, the kernel alone.
    errs = check_against_full(zigzag_ring_attention, 0, 1, "zigzag", causal=True, heads=4, kv_heads=2,
                              head_dim=16, chunk=6, dtype=torch.float64, device="cpu", seed=seed,
                              tol=TOL[torch.float64])
    assert max(errs.values()) < 1e-10


def _gpu_worker(rank, world, seed, results):
    from easy_context.attention import head_groups, kernels
    probe = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    tol = {"out": 2e-2, "lse": 1e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2}
    failures = []
    # The last case feeds [B, S, H, D] buffers (as HF does) and splits every call over head groups.
    cases = [(8, 8, 128, False, None), (8, 2, 64, False, None), (8, 2, 128, True, 2 * 1024 * 128)]
    for kernel in [k for k in kernels.available_kernels(probe, probe) if k != "reference"]:
        for (layout, attn), causal, (h, hkv, d, bshd, max_call) in itertools.product(
                BACKENDS.items(), (True, False), cases):
            head_groups.MAX_CALL_ELEMENTS = max_call or 2 ** 28
            try:
                errs = check_against_full(attn, rank, world, layout, causal=causal, heads=h, kv_heads=hkv,
                                          head_dim=d, chunk=512, batch=1, dtype=torch.bfloat16, device="cuda",
                                          seed=seed, tol=tol, kernel=kernel, bshd=bshd)
            except AssertionError as e:  # report every kernel/layout, then fail
                failures.append(str(e))
                continue
            if rank == 0:
                print(f"GPU {kernel:10s} {layout:10s} causal={causal!s:5s} H={h} Hkv={hkv} D={d} bshd={bshd} " +
                      " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_matches_full_attention_nccl_bf16(seed):
    run_distributed(_gpu_worker, 2, seed, None, backend="nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_matches_full_attention_bf16(seed):
    # one rank: each kernel's single call, its output in q's memory order (HF's [B, S, H, D] buffers too)
    run_distributed(_gpu_worker, 1, seed, None, backend="nccl")


@pytest.mark.parametrize("attn", [ring_attention, zigzag_ring_attention])
def test_one_rank_makes_one_kernel_call_each_way_and_returns_its_results_as_they_are(attn, seed):
    # With no other rank there is no transfer to overlap: the local causal block is not split in backward, and
    # nothing goes through float32 buffers (the kernel's out and gradients are the results, bit for bit).
    calls = []

    class Counting(ReferenceKernel):
        def forward(self, *args):
            calls.append("forward")
            return super().forward(*args)

        def backward(self, *args):
            calls.append("backward")
            return super().backward(*args)

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, 12, 16, generator=g, dtype=torch.float32) for h in (4, 2, 2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attn(*leaves, causal=True, kernel=Counting(), return_lse=True)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    assert calls == ["forward", "backward"]
    want_out, want_lse = ReferenceKernel().forward(q, k, v, True, 16 ** -0.5)
    want = ReferenceKernel().backward(dout, q, k, v, want_out, want_lse, True, 16 ** -0.5)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for leaf, grad in zip(leaves, want):
        assert torch.equal(leaf.grad, grad)
