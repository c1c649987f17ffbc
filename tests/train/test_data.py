"""data.py: rows of fixed length from every supported source, split by data-parallel rank, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from easy_context.train import data
from easy_context.world import default


@pytest.fixture(scope="module")
def tokenizer():
    return default.build_tokenizer()


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_sampler_gives_each_dp_rank_a_disjoint_equal_share(dp_size):
    shares = [list(data.ShardedSampler(10, r, dp_size, seed=1)) for r in range(dp_size)]
    assert all(len(s) == 10 // dp_size for s in shares)
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat)  # no row is read by two data-parallel groups


def test_sampler_resumes_where_it_stopped_and_reshuffles_per_epoch():
    s = data.ShardedSampler(20, 1, 2, seed=5)
    full = list(s)
    s.set_position(0, 4)
    assert list(s) == full[4:]
    s.set_position(1, 0)
    assert len(list(s)) == len(full) and list(s) != full  # a new permutation in the next epoch


def test_batches_continue_across_epochs_and_report_the_position(tokenizer):
    ds = [{"input_ids": torch.arange(i, i + 8)} for i in range(6)]
    sampler = data.ShardedSampler(len(ds), 0, 1, seed=0)
    got = []
    for epoch, row, (ids, labels) in data.batches(ds, sampler, 2, 4):
        assert labels is None  # rows without labels: the loss is on every token
        got.append((epoch, row, ids.shape))
        if len(got) == 4:
            break
    assert got == [(0, 2, (2, 4)), (0, 4, (2, 4)), (0, 6, (2, 4)), (1, 2, (2, 4))]


def test_text_is_packed_into_exact_rows_with_eos_between_documents(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    docs = ["The quiet river watched the old garden." * 20, "Another document about a lamp." * 30]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    ds = data.load_training_data(str(path), tokenizer, 64)
    flat = [t for d in docs for t in (*tokenizer(d)["input_ids"], tokenizer.eos_token_id)]
    assert len(ds) == len(flat) // 64
    assert torch.equal(torch.cat([ds[i]["input_ids"] for i in range(len(ds))]), torch.tensor(flat[: len(ds) * 64]))


def test_pretokenized_rows_from_save_to_disk_and_parquet(tmp_path, tokenizer):
    from datasets import Dataset

    rows = {"input_ids": [list(range(i, i + 40)) for i in range(5)], "other": list(range(5))}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "disk"))
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    for source in (tmp_path / "disk", tmp_path / "rows.parquet"):
        ds = data.load_training_data(str(source), tokenizer, 32)
        assert len(ds) == 5 and torch.equal(ds[2]["input_ids"], torch.arange(2, 42))


def test_bad_datasets_say_what_to_change(tmp_path, tokenizer):
    no_column = tmp_path / "a.jsonl"
    no_column.write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="needs a pre-tokenized 'input_ids' column or a text column"):
        data.load_training_data(str(no_column), tokenizer, 32)
    short = tmp_path / "b.jsonl"
    short.write_text("\n".join(json.dumps({"input_ids": list(range(n))}) for n in (40, 10)))
    with pytest.raises(ValueError, match="1 of the first 2 rows hold fewer than --seq-length 32"):
        data.load_training_data(str(short), tokenizer, 32)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(data.batches([{"input_ids": torch.zeros(8)}], data.ShardedSampler(1, 0, 1), 2, 8))


def test_tiny_sources_pick_where_the_loss_goes(tokenizer):
    assert "labels" not in data.load_training_data("tiny", tokenizer, 512)[0]
    answers = data.load_training_data("tiny:answers", tokenizer, 512)[0]["labels"]
    mixed = data.load_training_data("tiny:answers+0.2", tokenizer, 512)[0]["labels"]
    assert (mixed != -100).sum() > (answers != -100).sum()
    for bad in ("tiny:answers+x", "tiny:answers+2", "tiny:answersfoo"):
        with pytest.raises(ValueError, match="tiny:answers\\+F"):
            data.load_training_data(bad, tokenizer, 512)


def test_every_row_is_checked_not_only_the_first_thousand(tmp_path, tokenizer):
    from datasets import Dataset

    rows = [list(range(i % 50, i % 50 + 40)) for i in range(1500)]
    rows[1234] = rows[1234][:20]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "short"))
    with pytest.raises(ValueError, match=r"row 1234 holds 20 tokens, fewer than --seq-length 32.*shorter "
                                         r"--seq-length or a dataset chunked to at least 32"):
        data.load_training_data(str(tmp_path / "short"), tokenizer, 32)
    data.load_training_data(str(tmp_path / "short"), tokenizer, 20)  # 20 tokens suffice for --seq-length 20


@pytest.mark.parametrize("bad", [128, -1])
def test_token_ids_outside_the_vocabulary_are_refused_with_the_row(tmp_path, tokenizer, bad):
    from datasets import Dataset

    rows = [list(range(i % 50, i % 50 + 40)) for i in range(1500)]
    rows[1300][7] = bad
    Dataset.from_dict({"input_ids": rows}).to_parquet(str(tmp_path / "ids.parquet"))
    with pytest.raises(ValueError, match=rf"row 1300 holds token id {bad}, outside the model's vocabulary "
                                         r"\(vocab_size 128: ids 0-127\).*tokenized with this model's tokenizer"):
        data.load_training_data(str(tmp_path / "ids.parquet"), tokenizer, 32, vocab_size=128)
    if bad > 0:  # a bigger vocabulary holds it
        assert len(data.load_training_data(str(tmp_path / "ids.parquet"), tokenizer, 32, vocab_size=1000)) == 1500


@pytest.mark.parametrize("content", ["", "\n\n", "parquet"])
def test_a_dataset_without_rows_says_so(tmp_path, tokenizer, content):
    from datasets import Dataset

    if content == "parquet":
        path = tmp_path / "empty.parquet"
        Dataset.from_dict({"input_ids": []}).to_parquet(str(path))
    else:
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
    with pytest.raises(ValueError, match=f"dataset {str(path)!r} holds no rows: .*--dataset"):
        data.load_training_data(str(path), tokenizer, 32)
