"""resolve_plan: the backend looked up once, groups and layout fixed, and every rank's inputs sharded as the
backend's own entry point shards them; what cannot work is refused before any model exists."""

from __future__ import annotations

import pytest
import torch

from easy_context.attention.layouts import unshard
from easy_context.attention.registry import BACKENDS, REGISTRY, get_backend
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels
from easy_context.parallel.plan import resolve_plan
from tests.helpers.distributed import run_distributed


def _batch(seed: int, s: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, (2, s), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def test_every_backend_is_a_registry_entry_and_aliases_resolve():
    assert set(BACKENDS) < set(REGISTRY) and {"data_parallel", "s2attn"} <= set(REGISTRY)
    assert all(b.sequence_parallel and b.exact for b in BACKENDS.values())
    assert not REGISTRY["data_parallel"].sequence_parallel and not REGISTRY["s2attn"].exact
    assert get_backend("zigzag_ring_attn") is BACKENDS["zigzag_ring"]
    with pytest.raises(ValueError, match="choose one of"):
        get_backend("zigzag")


def test_one_process_plan_runs_whole_sequences(seed):
    ids, labels = _batch(seed)
    for name in REGISTRY:
        plan = resolve_plan(name)
        assert plan.groups.sp_size == 1 and not plan.sequence_parallel
        got = plan.shard_inputs(ids, labels)
        assert torch.equal(got.input_ids, ids) and torch.equal(got.target_ids, shift_labels(labels))
        assert torch.equal(got.position_ids, torch.arange(24)[None]) and got.documents is None
        packed = plan.shard_inputs(ids, labels, cu_seqlens=[0, 10, 24])  # two documents, positions made
        assert packed.documents.bounds == ((0, 10, 24),)
        assert torch.equal(packed.position_ids, torch.cat([torch.arange(10), torch.arange(14)])[None])
        assert (packed.target_ids[:, 9] == -100).all()  # no target across the boundary


def test_a_plan_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="needs a sequence-parallel backend"):
        resolve_plan("data_parallel", sp_size=2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_plan("ringg")


def _plans_shard_like_the_entry_point(rank: int, world: int, seed: int) -> None:
    ids, labels = _batch(seed)
    for name, degree, layout in (("zigzag_ring", None, "zigzag"), ("ring", None, "contiguous"),
                                 ("ulysses", None, "contiguous"), ("usp", 2, "usp2x2"), ("usp", 1, "usp1x4"),
                                 ("s2attn", None, "contiguous")):
        plan = resolve_plan(name, ulysses_degree=degree)
        assert plan.sequence_parallel and plan.layout == layout and plan.groups.sp_size == world
        packed = torch.cat([torch.arange(5), torch.arange(19)])[None]  # packed documents shard alike
        for pos in (None, packed):
            mine = plan.shard_inputs(ids, labels, pos)
            want = prepare_seq_parallel_inputs(plan.backend.name if name != "s2attn" else "ring", ids, labels, pos,
                                               group=plan.attention_group)
            for a, b in zip(mine.__dict__.values(), want.__dict__.values()):
                assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
        assert mine.documents.bounds == ((0, 5, 24),)
        gathered = [torch.empty_like(mine.input_ids) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine.input_ids)
        assert torch.equal(unshard(gathered, layout), ids)
        with pytest.raises(ValueError, match="multiple"):
            plan.check_length(25)
    dp = resolve_plan("zigzag_ring", sp_size=2)  # 2 data-parallel groups of 2
    assert (dp.groups.dp_size, dp.groups.sp_rank) == (2, rank % 2)
    assert dp.attention_group is dp.groups.sp_group


def test_plans_shard_every_rank_as_the_backends_entry_point_does(seed):
    run_distributed(_plans_shard_like_the_entry_point, 4, seed)
