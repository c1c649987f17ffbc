"""Point-to-point exchange: what is sent stays alive until the exchange is waited on."""

from __future__ import annotations

import gc
import weakref

import torch

from distributed import run_distributed
from easy_context.comm import RingComm, p2p


def _keepalive_worker(rank, world):
    peer = 1 - rank
    sent = torch.full((3, 4), float(rank)).t()  # non-contiguous: the exchange sends a contiguous copy
    ex = p2p([(sent, peer)], [(torch.empty(4, 3), peer)], None)
    held = [weakref.ref(t) for t in ex._sending]
    del sent
    gc.collect()
    # The buffers in flight are the exchange's to keep, whoever else drops them, until wait().
    assert held and all(r() is not None for r in held)
    got = ex.wait()
    assert torch.equal(got[0], torch.full((4, 3), float(peer)))
    assert ex._sending == []


def test_send_buffers_live_until_wait():
    run_distributed(_keepalive_worker, 2)


def _ring_worker(rank, world):
    x = torch.arange(6.0).view(2, 3).t() + 10 * rank  # non-contiguous, as a head slice or [B, S, H, D] view is
    got = RingComm().start([x]).wait()
    assert torch.equal(got[0], torch.arange(6.0).view(2, 3).t() + 10 * ((rank - 1) % world))


def test_ring_rotates_non_contiguous_tensors():
    run_distributed(_ring_worker, 3)
