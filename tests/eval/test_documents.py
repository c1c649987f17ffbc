"""Documents load from every source (jsonl, save_to_disk, parquet, a .txt directory), the first long-enough ones
kept, a leading BOS dropped; a missing column, no long-enough document or an empty directory raises."""

from __future__ import annotations

import json

import pytest

from easy_context.eval.documents import collect_documents, dataset_rows, text_dir_rows


class _Tok:
    """The tokenizer surface collect_documents uses: one id per character, BOS 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 100 for c in text]}


def test_documents_from_every_source(tmp_path):
    from datasets import Dataset

    tok = _Tok()
    rows = [{"text": "x" * 50}, {"text": "y" * 10}, {"text": "z" * 60}, {"text": "w" * 70}]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    docs, skipped = collect_documents(dataset_rows(str(tmp_path / "d.jsonl")), tok, min_tokens=40, samples=2)
    assert [len(d) for d in docs] == [50, 60] and skipped == 1  # the 4th is never read
    Dataset.from_dict({"input_ids": [[1] + list(range(5, 50)), [1, 5, 6]]}).save_to_disk(str(tmp_path / "tok"))
    docs, skipped = collect_documents(dataset_rows(str(tmp_path / "tok")), tok, min_tokens=40)
    assert docs == [list(range(5, 50))] and skipped == 1  # the leading BOS is dropped: each window adds one
    Dataset.from_dict({"body": ["a" * 45]}).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="--feature"):
        collect_documents(dataset_rows(str(tmp_path / "p.parquet")), tok, min_tokens=40)
    docs, _ = collect_documents(dataset_rows(str(tmp_path / "p.parquet")), tok, min_tokens=40, feature="body")
    assert len(docs[0]) == 45
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("b" * 41)
    (tmp_path / "txt" / "a.txt").write_text("a" * 42)
    docs, _ = collect_documents(text_dir_rows(str(tmp_path / "txt")), tok, min_tokens=40)
    assert [len(d) for d in docs] == [42, 41]  # name order
    with pytest.raises(ValueError, match="no document has the 100 tokens"):
        collect_documents(text_dir_rows(str(tmp_path / "txt")), tok, min_tokens=100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        list(text_dir_rows(str(tmp_path / "empty")))


def test_real_text_rows_cut_one_token_stream_into_equal_documents(tmp_path):
    from easy_context.eval.documents import real_text_rows
    from easy_context.world.default import build_tokenizer

    tok = build_tokenizer()
    (tmp_path / "a.txt").write_text("The first document. " * 30)
    (tmp_path / "b.txt").write_text("The second one. " * 30)
    rows, what = real_text_rows(str(tmp_path), tok, 50, split="all")
    stream = tok("The first document. " * 30 + "\n\n" + "The second one. " * 30, add_special_tokens=False)["input_ids"]
    assert [r["input_ids"] for r in rows] == [stream[i:i + 50] for i in range(0, len(stream) - 49, 50)]
    assert what.startswith(tmp_path.name) and "2 documents" in what
    with pytest.raises(ValueError, match="fewer than the 100000 the largest length needs"):
        real_text_rows(str(tmp_path), tok, 100_000, split="all")
