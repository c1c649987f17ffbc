"""cepe/data.py: the warmup stage gives the encoder the decoder's own window, the main stage the context before
it; the loss stays on the decoder's tokens; a context that is not a whole number of chunks is padded and masked.
(How a sequence-parallel rank's share is cut is checked against one process in test_sharded.py.)"""

from __future__ import annotations

import pytest
import torch

from easy_context.cepe.data import rank_inputs, row_length, split_rows, to_chunks
from easy_context.parallel.plan import resolve_plan

ROWS = torch.arange(2 * 40).view(2, 40)


def test_main_stage_context_chunks_then_the_window():
    assert row_length("main", window=16, context_chunks=3, chunk_size=8) == 40
    labels = ROWS.clone()
    labels[:, 30] = -100
    b = split_rows(ROWS, labels, stage="main", window=16, chunk_size=8)
    assert torch.equal(b.input_ids, ROWS[:, 24:]) and torch.equal(b.labels, labels[:, 24:])
    assert b.chunk_ids.shape == (2, 3, 8) and torch.equal(b.chunk_ids.reshape(2, 24), ROWS[:, :24])
    assert b.chunk_mask is None and torch.equal(b.teacher_ids, ROWS)


def test_warmup_stage_the_encoder_reads_the_window_itself():
    assert row_length("warmup", window=16, context_chunks=3, chunk_size=8) == 16
    b = split_rows(ROWS[:, :16], None, stage="warmup", window=16, chunk_size=4)
    assert torch.equal(b.chunk_ids.reshape(2, 16), b.input_ids) and b.labels is None
    assert torch.equal(b.teacher_ids, b.input_ids)


@pytest.mark.parametrize("stage", ["main", "warmup"])
def test_every_tensor_of_the_batch_lands_on_the_device_asked_for(stage):
    # rows and labels come from the data loader on the CPU; the model is on the GPU ("meta" stands in for it)
    b = split_rows(ROWS, ROWS.clone(), stage=stage, window=16, chunk_size=8, device="meta")
    tensors = [b.input_ids, b.labels, b.chunk_ids, b.teacher_ids] + ([] if b.chunk_mask is None else [b.chunk_mask])
    assert all(t.device.type == "meta" for t in tensors)


def test_a_context_that_is_no_whole_number_of_chunks_is_padded_at_its_end():
    ids, mask = to_chunks(ROWS[:, :10], 4, pad_id=99)
    assert ids.shape == mask.shape == (2, 3, 4)
    assert ids[0, 2].tolist() == [8, 9, 99, 99] and mask[0, 2].tolist() == [True, True, False, False]
    assert bool(mask[:, :2].all())


def test_rows_without_room_for_the_window_are_refused():
    with pytest.raises(ValueError, match="rows of 16 tokens hold no context and 16-token window"):
        split_rows(ROWS[:, :16], None, stage="main", window=16, chunk_size=8)
    with pytest.raises(ValueError, match="unknown CEPE stage 'both'"):
        row_length("both", window=16, context_chunks=3, chunk_size=8)


def test_a_data_parallel_rank_gets_the_whole_window_and_every_chunk():
    b = split_rows(ROWS, None, stage="main", window=16, chunk_size=8)
    ids, targets, positions, chunk_ids, chunk_mask, probs, top = rank_inputs(b, resolve_plan("data_parallel"))
    assert torch.equal(ids, b.input_ids) and torch.equal(targets[:, :-1], b.input_ids[:, 1:])
    assert targets[:, -1].eq(-100).all() and torch.equal(positions[0], torch.arange(16))
    assert torch.equal(chunk_ids, b.chunk_ids) and chunk_mask is None and probs is None and top is None
