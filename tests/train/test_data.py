"""data.py: rows of fixed length from every supported source, split by data-parallel rank, resumable."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from easy_context.parallel.plan import resolve_plan
from easy_context.train import data, instructions
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
    for epoch, row, (ids, labels, positions) in data.batches(ds, sampler, 2, 4):
        assert labels is None  # rows without labels: the loss is on every token
        assert positions is None  # rows without positions: each row is one document from position 0
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


def test_pretokenized_rows_keep_their_labels_so_the_loss_falls_only_where_they_say(tmp_path, tokenizer):
    from datasets import Dataset

    labels = [[-100] * 30 + list(range(i + 30, i + 40)) for i in range(5)]
    Dataset.from_dict({"input_ids": [list(range(i, i + 40)) for i in range(5)], "labels": labels,
                       "other": list(range(5))}).save_to_disk(str(tmp_path / "disk"))
    ds = data.load_training_data(str(tmp_path / "disk"), tokenizer, 32)
    assert sorted(ds.column_names) == ["input_ids", "labels"] and torch.equal(ds[3]["labels"], torch.tensor(labels[3]))
    _, _, (ids, got, positions) = next(data.batches(ds, data.ShardedSampler(len(ds), 0, 1, seed=0), 2, 32))
    assert positions is None and got.shape == ids.shape == (2, 32) and bool((got[:, :30] == -100).all())


def test_bad_datasets_say_what_to_change(tmp_path, tokenizer):
    no_column = tmp_path / "a.jsonl"
    no_column.write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="needs a pre-tokenized 'input_ids' column, a text column .* or "
                                         "instruction columns"):
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


# --- instruction data -------------------------------------------------------------------------------------------

def story(i: int, sentences: int) -> dict:
    return {"instruction": f"Story {i}:" + default.filler_text(sentences, seed=i) + " Which story is this?",
            "input": "", "output": f" Story {i}."}


def llama2_example(tokenizer, row: dict) -> list[int]:
    """LongAlpaca's formatting of one row without input: its prompt and output, then EOS."""
    text = instructions.LLAMA2_PROMPT.format(instruction=row["instruction"]) + row["output"]
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each segment of a packed row: where its position ids restart."""
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [len(row["position_ids"])]
    out = []
    for a, b in zip(starts, starts[1:]):
        assert row["position_ids"][a:b].tolist() == list(range(b - a))
        out.append((row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()))
    return out


@pytest.fixture
def stories(tmp_path, tokenizer):
    """A .jsonl of 12 stories of mixed lengths; story 5 is longer than 128 tokens, the others fit."""
    rows = [story(i, 30 if i == 5 else 1 + i % 6) for i in range(12)]
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [len(llama2_example(tokenizer, r)) > 128 for r in rows] == [i == 5 for i in range(12)]
    return str(path), rows


def test_instructions_are_packed_whole_with_restarting_positions_and_the_long_one_dropped(tokenizer, stories):
    path, rows = stories
    ds = data.load_training_data(path, tokenizer, 128)
    assert ds.dropped == 1 and "12 examples (1 longer than --seq-length 128 dropped" in ds.summary
    assert data.restarts_positions(ds)
    found = []
    for i in range(len(ds)):
        row = ds[i]
        assert all(len(row[k]) == 128 for k in ("input_ids", "labels", "position_ids"))
        for ids, labels in segments(row):
            if all(t == tokenizer.pad_token_id for t in ids):
                assert set(labels) == {-100}  # padding: a segment without loss
            else:
                found.append(ids)
    want = [llama2_example(tokenizer, r) for i, r in enumerate(rows) if i != 5]
    assert sorted(found) == sorted(want)  # every example whole, once; the long one in no row
    assert len(ds) < len(want)  # several examples share a row


def test_one_example_per_row_pads_each_example_and_labels_only_its_response(tokenizer, stories):
    path, rows = stories
    ds = data.load_training_data(path, tokenizer, 128, packing=False)
    assert len(ds) == 11 and ds.dropped == 1 and not data.restarts_positions(ds)
    for i, r in enumerate(r for i, r in enumerate(rows) if i != 5):
        row, want = ds[i], llama2_example(tokenizer, r)
        assert "position_ids" not in row
        assert row["input_ids"].tolist() == want + [tokenizer.pad_token_id] * (128 - len(want))
        labels = row["labels"][row["labels"] != -100]
        assert tokenizer.decode(labels) == r["output"] + tokenizer.eos_token


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_instruction_files_in_json_and_parquet_read_like_jsonl(tmp_path, tokenizer, stories, kind):
    from datasets import Dataset

    path, rows = stories
    other = tmp_path / f"stories.{kind}"
    if kind == "json":
        other.write_text(json.dumps(rows))  # one JSON list, as LongAlpaca-12k.json is
    else:
        Dataset.from_list(rows).to_parquet(str(other))
    a, b = data.load_training_data(path, tokenizer, 128), data.load_training_data(str(other), tokenizer, 128)
    assert len(a) == len(b) and all(torch.equal(a[i][k], b[i][k]) for i in range(len(a)) for k in a[i])


def test_packed_batches_carry_positions_and_resume_at_the_same_row(tokenizer):
    ds = data.load_training_data("tiny:instructions", tokenizer, 256, seed=4)
    sampler = data.ShardedSampler(len(ds), 0, 1, seed=4)
    stream = data.batches(ds, sampler, 2, 256)
    first = [next(stream) for _ in range(5)]
    for _, _, (ids, labels, positions) in first:
        assert ids.shape == labels.shape == positions.shape == (2, 256)
        assert (positions == 0).sum() >= 2  # each row starts at least one example (or a padding segment)
    epoch, row, _ = first[1]  # resume after the second batch, as a checkpoint would
    again = data.load_training_data("tiny:instructions", tokenizer, 256, seed=4)
    resumed = data.ShardedSampler(len(again), 0, 1, seed=4)
    resumed.set_position(epoch, row)
    for (_, _, want), (_, _, got) in zip(first[2:], data.batches(again, resumed, 2, 256)):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_all_examples_too_long_and_sft_flags_on_other_data_are_refused(tmp_path, tokenizer, stories):
    path, _ = stories
    with pytest.raises(ValueError, match=r"all 12 examples are longer than --seq-length 16 tokens .* raise"):
        data.load_training_data(path, tokenizer, 16)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "The quiet river watched the old garden." * 20}))
    for source, flags in ((str(text), {"prompt_format": "llama2"}), ("tiny", {"packing": False}),
                          ("tiny:answers", {"ignore_columns": ("x",)})):
        with pytest.raises(ValueError, match="apply to instruction data"):
            data.load_training_data(source, tokenizer, 64, **flags)


def test_packed_rows_are_refused_where_the_job_cannot_keep_examples_apart(tokenizer):
    packed = data.load_training_data("tiny:instructions", tokenizer, 256)
    padded = data.load_training_data("tiny:instructions", tokenizer, 256, packing=False)
    exact = resolve_plan("zigzag_ring")
    data.check_packed_rows(padded, resolve_plan("s2attn"), pose=True)  # one example per row: nothing to refuse
    with pytest.raises(SystemExit, match="--pose-target .* add --one-example-per-row"):
        data.check_packed_rows(packed, exact, pose=True)
    with pytest.raises(SystemExit, match="S²-Attn's shifted groups .* add --one-example-per-row"):
        data.check_packed_rows(packed, resolve_plan("s2attn"))
    row = packed[0]
    try:  # the plan's own answer, until every backend keeps packed documents apart
        exact.shard_inputs(row["input_ids"][None], row["labels"][None], row["position_ids"][None])
    except ValueError:
        with pytest.raises(SystemExit, match="cannot keep the examples of a row apart .* add --one-example-per-row"):
            data.check_packed_rows(packed, exact)
    else:
        data.check_packed_rows(packed, exact)


def test_the_built_in_data_needs_no_datasets_package(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    ds = data.load_training_data("tiny:answers+0.05", tokenizer, 256)
    assert len(ds) > 0 and ds[0]["input_ids"].shape[0] >= 256
