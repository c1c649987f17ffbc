"""Training rows of the task suite: exactly the length asked, the same for the same index and seed; labels on every
answer token, on no BOS, and on about the asked share of the other tokens; plain text rows labelled throughout;
tasks that cannot fit a length are named and left out; the folder written reads back row for row."""

from __future__ import annotations

import os

import pytest

from easy_context.eval.needle import haystack_tokens
from easy_context.eval.task_mixture import (TRAIN_SEED, TaskMixture, corpus_tokens, save_task_mixture,
                                            tasks_that_fit)
from easy_context.eval.tasks import build_tasks
from easy_context.world.default import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def mixture(tok):
    text, _ = haystack_tokens(tok, 20000)
    tasks = build_tasks(["needle", "multikey", "vt", "fwe"], tok, text, seed=TRAIN_SEED)
    return TaskMixture(tasks, text, 600, size=64, seed=3, text_share=0.25, text_fraction=0.1)


def test_rows_are_exact_reproducible_and_labelled_on_the_answers(tok, mixture):
    kinds, labelled, others = set(), 0, 0
    for i in range(len(mixture)):
        ids, labels, kind, start = mixture.row(i)
        kinds.add(kind)
        assert len(ids) == len(labels) == 600 and ids[0] == tok.bos_token_id and labels[0] == -100
        if kind == "text":
            assert start is None and labels[1:] == ids[1:]
            continue
        assert labels[start:] == ids[start:]  # the whole answer
        assert all(lab in (-100, t) for lab, t in zip(labels, ids))
        labelled += sum(lab != -100 for lab in labels[1:start])
        others += start - 1
    assert kinds == {"text", "needle", "multikey", "vt", "fwe"}
    assert 0.07 < labelled / others < 0.13  # text_fraction 0.1 of the other tokens
    row = mixture[5]
    assert row["input_ids"].tolist() == mixture.row(5)[0] and row["labels"].tolist() == mixture.row(5)[1]
    again = TaskMixture(mixture.tasks, mixture.text, 600, size=64, seed=3, text_share=0.25, text_fraction=0.1)
    assert again.row(17) == mixture.row(17)
    other = TaskMixture(mixture.tasks, mixture.text, 600, size=64, seed=4, text_share=0.25, text_fraction=0.1)
    assert other.row(17) != mixture.row(17)


def test_tasks_that_do_not_fit_are_named(tok):
    text, _ = haystack_tokens(tok, 4000)
    fit, skipped = tasks_that_fit(build_tasks(["needle", "cwe"], tok, text), 300)
    assert [t.name for t in fit] == ["needle"] and "too short for a cwe prompt" in skipped["cwe"]
    with pytest.raises(ValueError, match="text_share 1"):
        TaskMixture([], text, 300)
    with pytest.raises(ValueError, match="not in the mixture"):
        TaskMixture(fit, text, 300, weights={"cwe": 1.0})


def test_the_written_folder_reads_back_row_for_row(tok, mixture, tmp_path):
    from datasets import load_from_disk

    small = TaskMixture(mixture.tasks, mixture.text, 600, size=6, seed=3)
    ds = load_from_disk(save_task_mixture(str(tmp_path / "rows"), small))
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 6
    for i in range(6):
        assert (ds[i]["input_ids"], ds[i]["labels"]) == small.row(i)[:2]


def test_a_write_that_fails_leaves_no_folder_that_looks_finished(mixture, tmp_path, monkeypatch):
    import datasets

    def disk_full(self, path, **kwargs):  # the folder exists, half-written, when the disk fills
        os.makedirs(path)
        open(os.path.join(path, "data-00000-of-00001.arrow"), "w").close()
        raise OSError("no space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    small = TaskMixture(mixture.tasks, mixture.text, 600, size=2, seed=3)
    with pytest.raises(OSError, match="no space left"):
        save_task_mixture(str(tmp_path / "rows"), small)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left


def test_an_existing_folder_is_never_overwritten(mixture, tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "mine.txt").write_text("kept")
    small = TaskMixture(mixture.tasks, mixture.text, 600, size=2, seed=3)
    with pytest.raises(FileExistsError, match="choose another path"):
        save_task_mixture(str(tmp_path / "rows"), small)
    assert (tmp_path / "rows" / "mine.txt").read_text() == "kept"


def test_written_rows_follow_the_weights_and_a_task_not_named_weighs_one(tok, tmp_path, monkeypatch):
    import easy_context.eval.task_mixture as tm

    seen = []
    monkeypatch.setattr(tm, "save_task_mixture", lambda path, mixture, num_proc=None: seen.append(mixture) or path)
    tm.write_mixture(str(tmp_path / "rows"), tok, 600, 400, tasks=["needle", "multikey", "cwe"],
                     source="generated", weights={"multikey": 3.0, "cwe": 5.0})  # cwe does not fit 600 tokens
    kinds = [seen[0].row(i)[2] for i in range(400)]
    assert "cwe" not in kinds and 2 * kinds.count("needle") < kinds.count("multikey")  # 1 : 3 expected
    with pytest.raises(ValueError, match="not written: \\['vt'\\]"):
        tm.write_mixture(str(tmp_path / "more"), tok, 600, 4, tasks=["needle"], weights={"vt": 2.0})


def test_corpus_tokens_of_pydoc_are_its_train_part(tok):
    ids, what = corpus_tokens(tok, "pydoc", "train")
    assert "train" in what and len(ids) > 500_000
