"""USP (Ulysses inside, zigzag ring outside) equals full attention in the usp{U}x{R} layout."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed
from easy_context import new_usp_group, usp_attention
from tests.helpers.reference import check_against_full
from tests.helpers.sp_checks import TOL, check_cases_cpu, check_cases_gpu, check_single_process, mismatched_length_inputs

SHAPES = [(4, 4, 16), (4, 2, 32), (4, 1, 16), (6, 3, 8), (12, 2, 8)]  # (heads, kv_heads, head_dim)
DEGREES = {2: [(2, 1), (1, 2)], 3: [(3, 1), (1, 3)], 4: [(2, 2), (1, 4), (4, 1)]}  # world -> (ulysses, ring)
F64 = dict(dtype=torch.float64, device="cpu", tol=TOL[torch.float64], kernel="reference")


@contextlib.contextmanager
def _count_comm():
    """Record the group size of every all-to-all and count the point-to-point batches (the ring)."""
    calls = {"all_to_all": [], "p2p": 0}
    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def counted_a2a(out, inp, *args, group=None, **kwargs):
        calls["all_to_all"].append(dist.get_world_size(group))
        return a2a(out, inp, *args, group=group, **kwargs)

    def counted_batch(ops):
        calls["p2p"] += 1
        return batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counted_a2a, counted_batch
    try:
        yield calls
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


def _check_group_shape(rank, u, r, g):
    ring_rank, u_rank = divmod(rank, u)
    assert g.layout == f"usp{u}x{r}"
    assert dist.get_process_group_ranks(g.ulysses_group) == [ring_rank * u + i for i in range(u)]
    assert dist.get_process_group_ranks(g.ring_group) == [i * u + u_rank for i in range(r)]


def _worker(rank, world, seed):
    for j, (u, r) in enumerate(DEGREES[world]):
        g = new_usp_group(ulysses_degree=u, ring_degree=r)
        _check_group_shape(rank, u, r, g)
        with _count_comm() as calls:
            check_against_full(usp_attention, rank, world, g.layout, causal=True, heads=4 * world, kv_heads=1,
                               head_dim=8, chunk=3, seed=seed - 1 - j, group=g, **F64)
        # the degrees are not swapped: Ulysses all-to-alls span U ranks, the ring exists only when R > 1
        assert set(calls["all_to_all"]) == ({u} if u > 1 else set()), calls
        assert (calls["p2p"] > 0) == (r > 1), calls
        shapes = [s for s in SHAPES if s[0] % u == 0]
        check_cases_cpu(usp_attention, rank, world, g.layout, shapes, seed + 100 * j, chunk=3, group=g)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_full_attention_cpu(world, seed):
    run_distributed(_worker, world, seed)


def _errors_and_data_parallel_worker(rank, world, seed):
    # degrees checked before any communication
    with pytest.raises(ValueError, match=r"ulysses_degree \(2\) x ring_degree \(3\) = 6, but the sequence-parallel "
                                         r"group has 4 ranks"):
        new_usp_group(ulysses_degree=2, ring_degree=3)
    with pytest.raises(ValueError, match="ring_degree must be a positive int"):
        new_usp_group(ulysses_degree=4, ring_degree=0)
    # inconsistent arguments across ranks: the same error everywhere instead of a hang
    with pytest.raises(ValueError, match="every rank must pass the same ulysses_degree and ring_degree"):
        new_usp_group(ulysses_degree=4 if rank == 0 else 2, ring_degree=1 if rank == 0 else 2)
    with pytest.raises(ValueError, match=r"SP groups \[0, 1\] and \[2, 1\] overlap"):
        new_usp_group(ulysses_degree=2, ring_degree=1, sp_ranks=[[0, 1], [0, 1], [2, 1], [3, 2]][rank])

    g41, g14 = new_usp_group(ulysses_degree=4, ring_degree=1), new_usp_group(ulysses_degree=1, ring_degree=4)
    q = torch.randn(1, 6, 4, 16)
    with pytest.raises(ValueError, match=r"6 q heads cannot be split evenly over a Ulysses group \(ulysses_degree\) "
                                         r"of 4 ranks; sizes that work: \[1, 2, 3, 6\]"):
        usp_attention(q, q, q, group=g41)
    with pytest.raises(ValueError, match=r"pass group=new_usp_group"):
        usp_attention(q, q, q)
    with pytest.raises(ValueError, match="must be even"):
        usp_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], group=g14)
    with pytest.raises(ValueError, match="same shapes"):
        usp_attention(*mismatched_length_inputs(rank), group=g14)

    # data parallel x sequence parallel: two independent SP groups of 2, contiguous and interleaved ranks
    for j, (sp_groups, (u, r)) in enumerate([([[0, 1], [2, 3]], (2, 1)), ([[0, 2], [1, 3]], (1, 2))]):
        mine = next(s for s in sp_groups if rank in s)
        g = new_usp_group(ulysses_degree=u, ring_degree=r, sp_ranks=mine)
        assert dist.get_process_group_ranks(g.sp_group) == mine
        check_against_full(usp_attention, mine.index(rank), 2, g.layout, causal=True, heads=4, kv_heads=2,
                           head_dim=16, chunk=3, seed=seed + 10 * j + sp_groups.index(mine), group=g, **F64)


def test_errors_and_data_parallel_subgroups(seed):
    run_distributed(_errors_and_data_parallel_worker, 4, seed, timeout_s=60)


def _rank_local_errors_worker(rank, world, seed):
    # One rank's call fails a local check that the other passes: both must raise it, not hang in a collective.
    g12, g21 = new_usp_group(ulysses_degree=1, ring_degree=2), new_usp_group(ulysses_degree=2, ring_degree=1)
    q = torch.randn(1, 4, 3 if rank == 1 else 4, 16)  # odd length on rank 1 only
    with pytest.raises(ValueError, match="local length 3 x ulysses_degree 1 must be even"):
        usp_attention(q, q, q, group=g12)
    q = torch.randn(1, 3 if rank == 1 else 4, 4, 16)  # heads that do not split over 2 ranks on rank 1 only
    with pytest.raises(ValueError, match="3 q heads cannot be split evenly"):
        usp_attention(q, q, q, group=g21)
    q = torch.randn(1, 4, 4, 16)  # a hand-edited group object on rank 1 only
    with pytest.raises(ValueError, match="subgroups have sizes 2 x 2, not the declared 2 x 1"):
        usp_attention(q, q, q, group=dataclasses.replace(g21, ring_group=None) if rank == 1 else g21)
    # degrees whose product is wrong on rank 1 only: rank 1's check must not leave rank 0 alone in the exchange
    with pytest.raises(ValueError, match=r"rank 1 rejected its arguments: ulysses_degree \(2\) x ring_degree "
                                         r"\(2\) = 4, but the sequence-parallel group has 2 ranks"):
        new_usp_group(ulysses_degree=2, ring_degree=1 if rank == 0 else 2)
    for g in (g12, g21, new_usp_group(ulysses_degree=2, ring_degree=1)):  # still in step afterwards
        check_against_full(usp_attention, rank, world, g.layout, causal=True, heads=2, kv_heads=1, head_dim=8,
                           chunk=3, seed=seed, group=g, **F64)


def test_rank_local_errors_raise_on_every_rank(seed):
    run_distributed(_rank_local_errors_worker, 2, seed, timeout_s=20)


def _two_sp_groups_of_four_worker(rank, world, seed):
    mine = [0, 1, 2, 3] if rank < 4 else [4, 5, 6, 7]
    g = new_usp_group(ulysses_degree=2, ring_degree=2, sp_ranks=mine)
    assert dist.get_process_group_ranks(g.ring_group) == [mine[rank % 2], mine[2 + rank % 2]]
    for causal in (True, False):
        check_against_full(usp_attention, rank % 4, 4, g.layout, causal=causal, heads=4, kv_heads=1, head_dim=8,
                           chunk=2, seed=seed + rank // 4, group=g, **F64)


def test_data_parallel_two_sp_groups_of_four(seed):
    run_distributed(_two_sp_groups_of_four_worker, 8, seed)


def test_single_process_is_plain_attention(seed):
    g = new_usp_group(ulysses_degree=1, ring_degree=1)
    for group in (g, None):
        check_single_process(usp_attention, g.layout, seed, chunk=3, group=group)
    with pytest.raises(ValueError, match="product is 1"):
        new_usp_group(ulysses_degree=2, ring_degree=1)


def _gpu_worker(rank, world, seed):
    for u, r in DEGREES[2]:
        g = new_usp_group(ulysses_degree=u, ring_degree=r)
        check_cases_gpu(usp_attention, rank, world, g.layout, seed, f"usp{u}x{r}", group=g)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_matches_full_attention_nccl_bf16(seed):
    run_distributed(_gpu_worker, 2, seed, backend="nccl")
