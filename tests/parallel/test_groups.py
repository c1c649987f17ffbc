"""DP x SP process groups: consecutive ranks form an SP group, each SP group computes its own exact result;
sp_size must divide the world; SP group objects of every form resolve to rank, size and layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed
from easy_context import zigzag_ring_attention
from easy_context.parallel.groups import ParallelGroups, group_layout, group_rank_size, init_groups, sp_process_group
from easy_context.attention.layouts import shard
from easy_context.parallel.loss import sequence_parallel_cross_entropy
from tests.helpers.reference import check_against_full, rel_err


def _worker(rank, world, seed):
    for bad in (3, 0, 8, 2.0):
        with pytest.raises(ValueError, match="divisor of the world size 4"):
            init_groups(bad)
    g = init_groups(2)
    assert (g.sp_rank, g.sp_size, g.dp_rank, g.dp_size) == (rank % 2, 2, rank // 2, 2)
    assert dist.get_process_group_ranks(g.sp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(g.dp_group) == [rank % 2, rank % 2 + 2]
    assert group_rank_size(g.sp_group) == (g.sp_rank, 2)
    # Each SP group works on its own data (seed + dp_rank) and gets its own exact attention ...
    check_against_full(zigzag_ring_attention, g.sp_rank, 2, "zigzag", causal=True, heads=4, kv_heads=2,
                       head_dim=8, chunk=3, dtype=torch.float64, device="cpu", seed=seed + g.dp_rank,
                       tol=dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 1e-10), group=g.sp_group)
    # ... and its own exact token-mean loss, although the other group runs the same collectives.
    gen = torch.Generator().manual_seed(seed + g.dp_rank)
    hidden, weight = torch.randn(1, 12, 8, generator=gen, dtype=torch.float64), torch.randn(16, 8, generator=gen,
                                                                                           dtype=torch.float64)
    labels = torch.randint(16, (1, 12), generator=gen)
    ref = F.cross_entropy((hidden @ weight.T)[0], labels[0])
    out = sequence_parallel_cross_entropy(shard(hidden, "zigzag", g.sp_rank, 2), weight,
                                          shard(labels, "zigzag", g.sp_rank, 2), group=g.sp_group)
    assert rel_err(out.value, ref) < 1e-12
    # Data parallel only, and sequence parallel only.
    assert (init_groups(1).sp_size, init_groups(1).dp_size) == (1, 4)
    whole = init_groups(4)
    assert (whole.sp_rank, whole.dp_size) == (rank, 1)


def test_dp_x_sp_groups(seed):
    run_distributed(_worker, 4, seed)


def test_group_forms_without_distributed():
    assert group_rank_size(None) == (0, 1)
    usp_like = SimpleNamespace(sp_group=None, layout="usp2x2")
    assert sp_process_group(usp_like) is None and group_rank_size(usp_like) == (0, 1)
    assert group_layout("usp", usp_like) == "usp2x2" and group_layout("zigzag", None) == "zigzag"
    with pytest.raises(ValueError, match="not a sequence-parallel group"):
        sp_process_group(object())
    assert init_groups(1) == ParallelGroups(None, None, 0, 1, 0, 1)  # one plain process: nothing to split
    with pytest.raises(RuntimeError, match="init_process_group"):
        init_groups(2)
