"""PoSE position ids: strictly increasing from 0, below the target window, contiguous chunks, deterministic
under a generator, covering the window across samples; sharded by prepare_seq_parallel_inputs when skips
are allowed (restarting positions still raise); fed to a model without being read as packed documents."""

from __future__ import annotations

import pytest
import torch

from easy_context.hf.attention import apply_seq_parallel_monkey_patch
from easy_context.parallel.inputs import prepare_seq_parallel_inputs
from easy_context.attention.layouts import unshard
from easy_context.train.pose import pose_position_ids
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, pose_training_losses, tiny_model


@pytest.mark.parametrize("seq, target, chunks", [(64, 1024, 2), (64, 1024, 3), (16, 16, 2), (8, 100, 8), (5, 9, 1)])
def test_positions_rise_from_zero_below_the_target_in_contiguous_chunks(seq, target, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        pos = pose_position_ids(seq, target, chunks, generator=g)
        assert pos.dtype == torch.long and pos.shape == (seq,)
        steps = pos.diff()
        assert pos[0] == 0 and (steps >= 1).all() and pos[-1] < target
        assert int((steps > 1).sum()) <= chunks - 1  # contiguous inside each chunk: at most one jump between two
    if target == seq:
        assert torch.equal(pos, torch.arange(seq))  # no room to skip


def test_deterministic_under_a_generator():
    def draw(s):
        return pose_position_ids(256, 8192, generator=torch.Generator().manual_seed(s))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_covers_the_target_window(seed):
    seq, target = 64, 1024
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([pose_position_ids(seq, target, generator=g) for _ in range(400)])
    last = pos[:, -1]
    assert last.max() >= target - target // 20 and last.min() <= seq + target // 20  # the skip spans [0, T - L]
    hist = torch.histc(pos.float(), bins=8, min=0, max=target)
    assert (hist > 0).all(), hist  # every eighth of the window is used
    first_len = (pos.diff() > 1).float().argmax(1) + 1  # the first chunk's length varies
    assert first_len.unique().numel() > seq // 4


def test_rejects_impossible_requests():
    with pytest.raises(ValueError, match="at least the training length"):
        pose_position_ids(64, 32)
    with pytest.raises(ValueError, match="num_chunks"):
        pose_position_ids(4, 32, num_chunks=5)
    with pytest.raises(ValueError, match="num_chunks"):
        pose_position_ids(4, 32, num_chunks=0)


def test_sharded_for_sequence_parallel_only_when_skips_are_allowed(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, (2, 32), generator=g)
    pos = torch.stack([pose_position_ids(32, 4096, generator=g) for _ in range(2)])
    for backend, layout in (("ring", "contiguous"), ("zigzag_ring", "zigzag")):
        pieces = [prepare_seq_parallel_inputs(backend, ids, ids, pos, rank=r, world=2, allow_position_skips=True)
                  for r in range(2)]
        assert torch.equal(unshard([p.position_ids for p in pieces], layout), pos)
        assert torch.equal(unshard([p.input_ids for p in pieces], layout), ids)
    jumps = pos.diff().max() > 1
    if jumps:
        with pytest.raises(ValueError, match="count up by 1"):  # the default is unchanged
            prepare_seq_parallel_inputs("ring", ids, position_ids=pos)
    restart = torch.cat([pos[:1, :16], pos[:1, :16]], 1)  # a second document: still refused
    with pytest.raises(ValueError, match="packed"):
        prepare_seq_parallel_inputs("ring", ids, position_ids=restart, allow_position_skips=True)


def test_jumps_are_not_read_as_packed_documents(seed):
    ids = torch.randint(128, (1, 32), generator=torch.Generator().manual_seed(seed))
    pos = torch.cat([torch.arange(16), torch.arange(16) + 500])[None]  # one PoSE jump
    full = apply_seq_parallel_monkey_patch("ring", tiny_model("llama", seed))(input_ids=ids, position_ids=pos).logits
    sdpa = tiny_model("llama", seed)
    cut = sdpa(input_ids=ids, position_ids=pos).logits
    # sdpa without a mask reads the jump as a document boundary: the second chunk no longer sees the first.
    assert rel_err(cut[:, :16], full[:, :16]) < 1e-5 and rel_err(cut[:, 16:], full[:, 16:]) > 1e-3
    ones = sdpa(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
    assert rel_err(ones, full) < 1e-5  # an all-ones mask (or an easy_context attention) keeps full attention


def test_tiny_model_trains_on_pose_positions(seed):
    ids, labels = batch(seed, 2, 64)
    model = apply_seq_parallel_monkey_patch("ring", tiny_model("llama", seed))  # 1 process: plain attention
    losses = pose_training_losses(model, ids, labels, 1024, seed)  # positions resampled every step
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
