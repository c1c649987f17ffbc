"""prepare_seq_parallel_inputs: labels shifted once on the full sequence, then ids, targets and global
positions sharded alike for each backend's layout; bad input raises before any work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels
from easy_context.attention.layouts import position_ids, unshard


def _full_batch(seed, b=2, s=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return ids, labels


def test_shift_once_then_shard(seed):
    ids, labels = _full_batch(seed)
    targets = shift_labels(labels)
    assert torch.equal(targets[:, :-1], labels[:, 1:]) and (targets[:, -1] == -100).all()
    for backend, layout in (("ring", "contiguous"), ("zigzag_ring", "zigzag")):
        for world in (1, 2, 3):
            pieces = [prepare_seq_parallel_inputs(backend, ids, labels, rank=r, world=world) for r in range(world)]
            assert torch.equal(unshard([p.input_ids for p in pieces], layout), ids)
            assert torch.equal(unshard([p.target_ids for p in pieces], layout), targets)
            for r, p in enumerate(pieces):
                assert torch.equal(p.position_ids, position_ids(24, layout, r, world))  # global, not local


def test_layout_from_a_composite_group_and_given_positions(seed):
    ids, labels = _full_batch(seed, s=16)
    usp = SimpleNamespace(sp_group=None, layout="usp2x2")  # what new_usp_group returns, as far as inputs care
    pos = torch.arange(100, 116).unsqueeze(0)  # an offset document is still one document
    pieces = [prepare_seq_parallel_inputs("usp", ids, labels, pos, rank=r, world=4, group=usp) for r in range(4)]
    assert torch.equal(unshard([p.input_ids for p in pieces], "usp2x2"), ids)
    assert torch.equal(unshard([p.position_ids for p in pieces], "usp2x2"), pos)
    assert prepare_seq_parallel_inputs("ring", ids).target_ids is None


def test_bad_inputs_raise_before_work():
    ids = torch.zeros(2, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_seq_parallel_inputs("zigzag_ring", ids, rank=0, world=4)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        prepare_seq_parallel_inputs("ring", ids[0])
    with pytest.raises(ValueError, match="labels"):
        prepare_seq_parallel_inputs("ring", ids, ids[:, :-1])
    with pytest.raises(ValueError, match="position_ids must be"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=torch.arange(29)[None])
    packed = torch.cat([torch.arange(10), torch.arange(20)])[None]
    with pytest.raises(ValueError, match="packed"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=packed)
    with pytest.raises(ValueError, match="outside"):
        prepare_seq_parallel_inputs("ring", ids, rank=2, world=2)
    with pytest.raises(ValueError, match="both rank and world"):
        prepare_seq_parallel_inputs("ring", ids, rank=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        prepare_seq_parallel_inputs("rign", ids)


def _mismatch_worker(rank, world):
    ids = torch.arange(16).view(1, 16)
    if rank == 1:
        ids = ids.flip(1)  # same tokens, other order: the ranks would train on different sequences
    with pytest.raises(ValueError, match="the full batch"):
        prepare_seq_parallel_inputs("zigzag_ring", ids)
    prepare_seq_parallel_inputs("zigzag_ring", torch.arange(16).view(1, 16))  # same batch: fine


def test_ranks_with_different_batches_raise():
    run_distributed(_mismatch_worker, 2, timeout_s=30)
