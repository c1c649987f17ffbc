"""Ulysses all-to-all attention equals full attention on the unsharded sequence (out, lse, dq, dk, dv)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context import ulysses_attention
from easy_context.attention.ulysses import kv_replication
from tests.helpers.sp_checks import check_cases_cpu, check_single_process, gpu_worker, mismatched_length_inputs

# (heads, kv_heads, head_dim); a world runs those whose heads it divides. Kv heads are replicated when
# the world does not divide them: (4, 1) at P=2/4, (4, 2) at P=4, (6, 3) at P=2, (6, 2) and (12, 4) at P=3.
SHAPES = [(4, 4, 16), (4, 2, 32), (4, 1, 16), (6, 3, 16), (6, 2, 8), (12, 4, 8)]


def _worker(rank, world, seed):
    shapes = [s for s in SHAPES if s[0] % world == 0]
    assert any(kv_replication(h, hkv, world) > 1 for h, hkv, _ in shapes)
    check_cases_cpu(ulysses_attention, rank, world, "contiguous", shapes, seed)
    # errors, raised on every rank before any communication
    q = torch.randn(1, world + 1, 4, 16)
    with pytest.raises(ValueError, match=rf"{world + 1} q heads cannot be split evenly over a sequence-parallel "
                                         rf"group of {world} ranks; sizes that work: \[1, "):
        ulysses_attention(q, q, q)
    with pytest.raises(ValueError, match="same shapes"):
        ulysses_attention(*mismatched_length_inputs(rank, heads=world * 2))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_full_attention_cpu(world, seed):
    run_distributed(_worker, world, seed)


def _heads_differ_across_ranks_worker(rank, world, seed):
    # Rank 1 has 3 heads (not divisible by 2 ranks), rank 0 has 4: rank 1 fails the local head check, and
    # rank 0 must raise with it instead of waiting alone in the cross-rank check until the timeout.
    q = torch.randn(1, 3 if rank == 1 else 4, 4, 16)
    with pytest.raises(ValueError, match="3 q heads cannot be split evenly"):
        ulysses_attention(q, q, q)
    check_cases_cpu(ulysses_attention, rank, world, "contiguous", [(2, 1, 8)], seed, causals=(True,),
                    kernels=[("reference", torch.float64)], chunk=3)  # still in step afterwards


def test_heads_differing_across_ranks_raise_on_every_rank(seed):
    run_distributed(_heads_differ_across_ranks_worker, 2, seed, timeout_s=20)


def test_kv_replication_rule():
    assert kv_replication(8, 8, 4) == 1  # split kv heads like q heads
    assert kv_replication(8, 2, 4) == 2  # P > kv heads: each kv head on two ranks
    assert kv_replication(8, 1, 8) == 8
    assert kv_replication(12, 4, 3) == 3  # P and kv heads coprime: 12 kv heads, 4 per rank


def test_single_process_is_plain_attention(seed):
    check_single_process(ulysses_attention, "contiguous", seed)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_matches_full_attention_nccl_bf16(seed):
    run_distributed(gpu_worker, 2, seed, ulysses_attention, "contiguous", "ulysses", backend="nccl")
