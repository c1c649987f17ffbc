"""prepare_seq_parallel_inputs: labels shifted once on the full sequence, then ids, targets and global
positions sharded alike for each backend's layout; packed documents (restarting positions or cu_seqlens)
described for the whole sequence; bad input raises before any work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.attention.documents import Documents
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels, whole_batch
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
    jump = torch.cat([torch.arange(10), torch.arange(20) + 11])[None]
    with pytest.raises(ValueError, match="count up by 1"):  # a forward jump without allow_position_skips
        prepare_seq_parallel_inputs("ring", ids, position_ids=jump)
    pose_and_packed = torch.cat([torch.arange(10), torch.arange(10) + 50, torch.arange(10)])[None]
    with pytest.raises(ValueError, match="restart .* although allow_position_skips declares PoSE"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=pose_and_packed, allow_position_skips=True)
    with pytest.raises(ValueError, match="restart at a value other than 0"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=torch.cat([torch.arange(10), torch.arange(20) + 3])[None])
    with pytest.raises(ValueError, match="different documents"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=torch.arange(30)[None], cu_seqlens=[0, 10, 30])
    with pytest.raises(ValueError, match="rise strictly from 0"):
        prepare_seq_parallel_inputs("ring", ids, cu_seqlens=[0, 10, 10, 30])
    with pytest.raises(ValueError, match="documents for 3 rows"):
        prepare_seq_parallel_inputs("ring", ids, cu_seqlens=[[0, 30], [0, 5, 30], [0, 30]])
    with pytest.raises(ValueError, match="outside"):
        prepare_seq_parallel_inputs("ring", ids, rank=2, world=2)
    with pytest.raises(ValueError, match="both rank and world"):
        prepare_seq_parallel_inputs("ring", ids, rank=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        prepare_seq_parallel_inputs("rign", ids)


def test_packed_documents_shard_like_tokens_and_lose_their_cross_document_targets(seed):
    ids, labels = _full_batch(seed)
    packed = torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)])[None].expand(2, -1)
    for backend, layout in (("ring", "contiguous"), ("zigzag_ring", "zigzag")):
        for world in (1, 2, 3):
            pieces = [prepare_seq_parallel_inputs(backend, ids, labels, packed, rank=r, world=world)
                      for r in range(world)]
            assert all(p.documents == Documents(((0, 7, 19, 24),)) for p in pieces)  # the whole row's, on every rank
            assert torch.equal(unshard([p.position_ids for p in pieces], layout), packed)
            targets = unshard([p.target_ids for p in pieces], layout)
            want = shift_labels(labels)
            want[:, [6, 18]] = -100  # a document's last token does not predict the next document's first
            assert torch.equal(targets, want)
    by_lengths = whole_batch(ids, labels, cu_seqlens=torch.tensor([0, 7, 19, 24]))
    assert torch.equal(by_lengths.position_ids, packed[:1])
    assert by_lengths.documents == whole_batch(ids, labels, packed).documents
    assert torch.equal(by_lengths.target_ids, whole_batch(ids, labels, packed).target_ids)
    per_row = whole_batch(ids, labels, cu_seqlens=[[0, 24], [0, 3, 24]])  # rows with their own documents
    assert per_row.documents.bounds == ((0, 24), (0, 3, 24))
    assert torch.equal(per_row.position_ids[1, :5], torch.tensor([0, 1, 2, 0, 1]))
    assert whole_batch(ids, labels).documents is None


def _mismatch_worker(rank, world):
    ids = torch.arange(16).view(1, 16)
    if rank == 1:
        ids = ids.flip(1)  # same tokens, other order: the ranks would train on different sequences
    with pytest.raises(ValueError, match="the full batch"):
        prepare_seq_parallel_inputs("zigzag_ring", ids)
    ids = torch.arange(16).view(1, 16)
    with pytest.raises(ValueError, match="the full batch"):  # same tokens, other documents
        prepare_seq_parallel_inputs("zigzag_ring", ids, cu_seqlens=[0, 4 + rank, 16])
    prepare_seq_parallel_inputs("zigzag_ring", ids)  # same batch: fine


def test_ranks_with_different_batches_raise():
    run_distributed(_mismatch_worker, 2, timeout_s=30)
