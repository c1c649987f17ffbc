"""DistFlashAttn's balanced causal schedule covers every block once and equals full attention."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context import dist_flash_attention
from easy_context.attention.dist_flash import num_steps, schedule_table
from easy_context.attention.kernels import ReferenceKernel
from tests.helpers.reference import check_against_full
from tests.helpers.sp_checks import TOL, check_cases_cpu, check_single_process, gpu_worker, mismatched_length_inputs

SHAPES = [(4, 4, 16), (4, 2, 32), (6, 1, 16)]  # (heads, kv_heads, head_dim): MHA, GQA, MQA


@pytest.mark.parametrize("world", range(1, 13))
def test_schedule_covers_every_causal_block_once_in_half_the_steps(world):
    table = schedule_table(world)
    assert len(table) == num_steps(world) == world // 2 + 1
    blocks = [blk for row in table for blk in row if blk is not None]
    assert sorted(blocks) == [(i, j) for i in range(world) for j in range(i + 1)]
    if world > 1:  # the busiest rank does P//2 + 1 blocks, not P as in the plain ring
        assert max(sum(row[r] is not None for row in table) for r in range(world)) == world // 2 + 1


def test_schedule_table_for_four_ranks_matches_the_docstring():
    assert schedule_table(4) == [[(0, 0), (1, 1), (2, 2), (3, 3)],
                                 [(3, 0), (1, 0), (2, 1), (3, 2)],
                                 [None, None, (2, 0), (3, 1)]]


class _CountingKernel(ReferenceKernel):
    """The reference kernel, counting forward and backward block calls."""

    def __init__(self):
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, *args):
        self.calls["forward"] += 1
        return super().forward(*args)

    def backward(self, *args):
        self.calls["backward"] += 1
        return super().backward(*args)


def _worker(rank, world, seed):
    check_cases_cpu(dist_flash_attention, rank, world, "contiguous", SHAPES, seed)
    # each rank computes exactly its column of the table, in forward and in backward
    kernel = _CountingKernel()
    check_against_full(dist_flash_attention, rank, world, "contiguous", causal=True, heads=4, kv_heads=2, head_dim=8,
                       chunk=4, dtype=torch.float64, device="cpu", seed=seed - 1, tol=TOL[torch.float64],
                       kernel=kernel, bshd=True)  # q, k, v and the results travel in [B, S, H, D] memory order
    mine = sum(row[rank] is not None for row in schedule_table(world))
    assert kernel.calls == {"forward": mine, "backward": mine}, (kernel.calls, mine)
    with pytest.raises(ValueError, match="same shapes"):
        dist_flash_attention(*mismatched_length_inputs(rank))


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_matches_full_attention_cpu(world, seed):
    run_distributed(_worker, world, seed)


def _rank_local_error_worker(rank, world, seed):
    # Only the last rank's call fails a local check: every rank must raise it, not hang in a collective.
    bad = rank == world - 1
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        dist_flash_attention(q, q, q.double() if bad else q)
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        dist_flash_attention(q, q, q, kernel="nope" if bad else None)
    check_against_full(dist_flash_attention, rank, world, "contiguous", causal=True, heads=2, kv_heads=1, head_dim=8,
                       chunk=3, dtype=torch.float64, device="cpu", seed=seed, tol=TOL[torch.float64])


def test_rank_local_errors_raise_on_every_rank(seed):
    run_distributed(_rank_local_error_worker, 3, seed, timeout_s=20)


def test_single_process_is_plain_attention(seed):
    check_single_process(dist_flash_attention, "contiguous", seed)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_matches_full_attention_nccl_bf16(seed):
    run_distributed(gpu_worker, 2, seed, dist_flash_attention, "contiguous", "dist_flash", backend="nccl")
