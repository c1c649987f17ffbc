"""Point-to-point exchange: tensors travel in their memory order, and what is sent stays alive until the
exchange is waited on."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.attention.comm import RingComm, check_same_across_ranks, empty_in_order, memory_order, p2p, packed


def _keepalive_worker(rank, world):
    peer = 1 - rank
    sent = torch.arange(24.0).view(4, 6)[:, :3] + 100 * rank  # not dense: the exchange sends a packed copy
    ex = p2p([(sent, peer)], [(empty_in_order(sent), peer)], None)
    held = [weakref.ref(t) for t in ex._sending]
    del sent
    gc.collect()
    # The buffers in flight are the exchange's to keep, whoever else drops them, until wait().
    assert held and all(r() is not None for r in held)
    got = ex.wait()
    assert torch.equal(got[0], torch.arange(24.0).view(4, 6)[:, :3] + 100 * peer)
    assert ex._sending == []


def test_send_buffers_live_until_wait():
    run_distributed(_keepalive_worker, 2)


def test_memory_order_lists_dims_outermost_first():
    bshd = torch.empty(2, 5, 3, 4).transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] buffer
    assert memory_order(bshd) == [0, 2, 1, 3]
    assert memory_order(torch.empty(2, 3)) == [0, 1]
    # broadcast dims go outermost, so a packed copy keeps the innermost dim innermost
    assert memory_order(torch.empty(2, 1, 8).expand(2, 3, 8)) == [1, 0, 2]
    buf = empty_in_order(bshd[:, :, 1:4], torch.float64)  # a slice: dense, same order, own dtype
    assert buf.shape == (2, 3, 3, 4) and buf.dtype == torch.float64 and memory_order(buf) == [0, 2, 1, 3]
    assert packed(bshd).data_ptr() == bshd.data_ptr()  # dense: a view, no copy


def _ring_worker(rank, world):
    # a [B, H, S, D] view of a [B, S, H, D] buffer, as a Hugging Face model hands K/V over
    x = (torch.arange(24.0).view(1, 4, 3, 2) + 100 * rank).transpose(1, 2)
    ex = RingComm().start([x])
    assert [t.data_ptr() for t in ex._sending] == [x.data_ptr()]  # sent as is: no layout copy
    got = ex.wait()[0]
    assert got.stride() == x.stride()  # received in the same memory order
    assert torch.equal(got, (torch.arange(24.0).view(1, 4, 3, 2) + 100 * ((rank - 1) % world)).transpose(1, 2))
    with pytest.raises(ValueError, match="empty_in_order"):  # a slice cannot be received into in place
        p2p([], [(torch.empty(4, 6)[:, :3], (rank + 1) % world)], None)


def test_ring_rotates_tensors_in_their_memory_order():
    run_distributed(_ring_worker, 3)


def _check_worker(rank, world):
    names = ["a", "b"]
    check_same_across_ranks([1, 2], names, None, torch.device("cpu"), "f")  # all equal: passes
    # a local error on rank 1 only (its values unavailable): every rank raises it, naming the rank
    err = ValueError("f: x must be even") if rank == 1 else None
    with pytest.raises(ValueError, match=r"^f: rank 1 rejected its inputs: x must be even$") as e:
        check_same_across_ranks(None if rank == 1 else [1, 2], names, None, torch.device("cpu"), "f", err)
    assert e.value.__cause__ is err
    # the same error on every rank: each raises its own, unchanged
    err = ValueError(f"f: bad on {rank}")
    with pytest.raises(ValueError) as e:
        check_same_across_ranks([1, 2], names, None, torch.device("cpu"), "f", err)
    assert e.value is err
    # a local error and mismatched values: both reported, on every rank
    err = ValueError("f: too long") if rank == 2 else None
    with pytest.raises(ValueError, match=r"rank 2 rejected its inputs: too long; and every rank .* same shapes "
                                         r"and options, got rank 0: a=1, b=2; rank 1: a=1, b=2; rank 2: a=1, b=3"):
        check_same_across_ranks([1, 2 + (rank == 2)], names, None, torch.device("cpu"), "f", err)
    check_same_across_ranks([3, 4], names, None, torch.device("cpu"), "f")  # still in step


def test_local_errors_raise_on_every_rank():
    run_distributed(_check_worker, 3, timeout_s=20)
