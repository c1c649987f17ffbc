"""Layouts: shard/unshard round trips, position ids, and the usp{U}x{R} layout's contract with USP."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.attention import layouts
from easy_context.attention.registry import BACKENDS, backend_layout

USP_DEGREES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (3, 2), (2, 3)]


@pytest.mark.parametrize("layout,world", [("contiguous", 3), ("zigzag", 3)] +
                         [(f"usp{u}x{r}", u * r) for u, r in USP_DEGREES])
def test_shard_unshard_round_trip_and_position_ids(layout, world, seed):
    seq = 4 * layouts.num_chunks(layout, world)
    x = torch.randn(2, seq, 3, generator=torch.Generator().manual_seed(seed))
    pieces = [layouts.shard(x, layout, r, world, dim=1) for r in range(world)]
    assert all(p.shape == (2, seq // world, 3) for p in pieces)
    assert torch.equal(layouts.unshard(pieces, layout, dim=1), x)
    # position ids are the shard of arange: together they cover every position exactly once
    pos = [layouts.position_ids(seq, layout, r, world, batch=2) for r in range(world)]
    assert all(torch.equal(p[0], p[1]) for p in pos)
    assert sorted(torch.cat([p[0] for p in pos]).tolist()) == list(range(seq))
    for r, p in enumerate(pos):
        ranges = layouts.local_ranges(seq, layout, r, world)
        assert p[0].tolist() == [i for a, b in ranges for i in range(a, b)]


@pytest.mark.parametrize("u,r", USP_DEGREES)
def test_usp_ulysses_gather_is_the_ring_ranks_zigzag_piece(u, r):
    # The Ulysses all-to-all concatenates the U pieces of one ring rank in ulysses-rank order.
    seq = 2 * r * u * 3
    full = torch.arange(seq)
    for ring_rank in range(r):
        gathered = torch.cat([layouts.shard(full, f"usp{u}x{r}", ring_rank * u + ur, u * r, dim=0)
                              for ur in range(u)])
        assert torch.equal(gathered, layouts.shard(full, "zigzag", ring_rank, r, dim=0))


@pytest.mark.parametrize("p", [1, 2, 4])
def test_usp_degenerate_degrees_equal_contiguous_and_zigzag(p):
    seq = 8 * p
    for rank in range(p):
        x = torch.arange(seq)
        for usp, same in ((f"usp{p}x1", "contiguous"), (f"usp1x{p}", "zigzag")):
            assert torch.equal(layouts.shard(x, usp, rank, p, dim=0), layouts.shard(x, same, rank, p, dim=0))


def test_bad_lengths_and_names_raise():
    with pytest.raises(ValueError, match=r"usp2x2 layout over 4 ranks needs the sequence length to be a "
                                         r"multiple of 8 \(2 x 2 ring x 2 ulysses ranks\); got 12: pad or "
                                         r"truncate to 8 or 16"):
        layouts.check_length(12, "usp2x2", 4)
    with pytest.raises(ValueError, match="multiple of 12"):
        layouts.shard(torch.zeros(1, 18), "usp3x2", 0, 6)
    # the existing layouts keep their messages
    with pytest.raises(ValueError, match=r"zigzag layout over 3 ranks needs the sequence length to be a "
                                         r"multiple of 6 \(2 x 3 ranks\); got 7"):
        layouts.check_length(7, "zigzag", 3)
    with pytest.raises(ValueError, match=r"contiguous layout over 3 ranks needs the sequence length to be a "
                                         r"multiple of 3 \(3 ranks\); got 7"):
        layouts.check_length(7, "contiguous", 3)
    with pytest.raises(ValueError, match=r"usp2x2 layout is for 2 x 2 = 4 ranks, got 2"):
        layouts.shard(torch.zeros(1, 16), "usp2x2", 0, 2)
    with pytest.raises(ValueError, match=r"usp2x2 layout is for 2 x 2 = 4 ranks, got 3"):
        layouts.unshard([torch.zeros(1, 4)] * 3, "usp2x2")
    for bad in ("usp", "usp0x2", "usp2x", "usp2x2x2", "ulysses"):
        with pytest.raises(ValueError, match="unknown layout"):
            layouts.num_chunks(bad, 4)


def _gather_worker(rank, world, seed):
    full = torch.randn(2, 4 * world, 3, generator=torch.Generator().manual_seed(seed))
    for layout in ("contiguous", "zigzag"):
        assert torch.equal(layouts.gather(layouts.shard(full, layout, rank, world), layout), full)
    # pieces that differ across ranks, or that cannot be cut into the layout's chunks on one rank only:
    # every rank raises, rather than gloo aborting one process and handing the others a garbled tensor
    with pytest.raises(ValueError, match="same shapes"):
        layouts.gather(torch.zeros(1, 8 if rank == 0 else 6, 2), "contiguous")
    with pytest.raises(ValueError, match=r"rank 1 rejected its inputs: .*zigzag layout is 2 chunks.*multiple of 2; got 7"):
        layouts.gather(torch.zeros(1, 7 if rank == 1 else 8, 2), "zigzag")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        layouts.gather(torch.zeros(1, 8, 2), "nope" if rank == 1 else "zigzag")
    assert torch.equal(layouts.gather(layouts.shard(full, "zigzag", rank, world), "zigzag"), full)  # in step


def test_gather_rebuilds_the_full_tensor_and_rejects_mismatched_pieces_on_every_rank(seed):
    run_distributed(_gather_worker, 2, seed, timeout_s=20)


def test_backend_layouts():
    assert backend_layout("usp", ulysses_degree=2, ring_degree=4) == "usp2x4"
    assert backend_layout("ulysses") == backend_layout("dist_flash") == backend_layout("ring") == "contiguous"
    assert backend_layout("zigzag_ring") == "zigzag"
    assert {"ulysses", "usp", "dist_flash"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown attention backend"):
        backend_layout("nope")
