"""packing.py: examples go whole into fixed-length rows, packed with position ids that restart at each example
(the DataCollatorWithFlattening convention) or one per row; padding never carries loss."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from easy_context.train.packing import ExampleRows, pack_lengths


@pytest.mark.parametrize("seed", range(5))
def test_packing_places_every_example_once_within_the_row_length(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 100)]) for _ in range(300)]
    groups = pack_lengths(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) <= 100
    # no two rows could have been one: a row was opened only for an example that fit no open row
    assert min(a + b for j, a in enumerate(loads) for b in loads[j + 1:]) > 100
    assert pack_lengths(lengths, 100) == groups  # a function of the lengths alone


def test_short_examples_fill_the_gaps_of_long_ones():
    assert pack_lengths([3, 5, 4, 5, 3], 10) == [[1, 3], [2, 0, 4]]  # two full rows, not three
    assert pack_lengths([10, 10], 10) == [[0], [1]]
    with pytest.raises(ValueError, match="example 1 holds 11 tokens: it needs 1 to 10"):
        pack_lengths([4, 11], 10)


@pytest.fixture
def examples():
    ids = [list(range(100, 100 + n)) for n in (5, 3, 6)]
    labels = [[-100] * (len(x) - 2) + x[-2:] for x in ids]  # loss on each example's last two tokens
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def test_a_packed_row_restarts_positions_at_each_example_and_pads_without_loss(examples):
    rows = ExampleRows(examples, [[2, 0], [1]], 12, pad_id=2, packed=True)
    assert len(rows) == 2
    row = rows[0]
    assert row["input_ids"].tolist() == [*range(100, 106), *range(100, 105), 2]
    assert row["position_ids"].tolist() == [*range(6), *range(5), 0]
    assert row["labels"].tolist() == [-100] * 4 + [104, 105] + [-100] * 3 + [103, 104] + [-100]
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
    assert starts == [0, 6, 11]  # each example and the padding begin a segment of their own
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, *range(9)]


def test_one_example_per_row_is_padded_without_positions(examples):
    rows = ExampleRows(examples, [[0], [1], [2]], 8, pad_id=2, packed=False)
    row = rows[1]
    assert set(row) == {"input_ids", "labels"}  # plain rows: each one document from position 0
    assert row["input_ids"].tolist() == [100, 101, 102, 2, 2, 2, 2, 2]
    assert row["labels"].tolist() == [-100, 101, 102] + [-100] * 5
