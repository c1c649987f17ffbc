"""real_text: the standard library's docs are read from source without importing anything, in name order, the same
on every call; the train and held-out parts split the documents between them by name; a folder of .txt files reads
in name order; the description names the Python version and the text's digest; bad input raises clearly."""

from __future__ import annotations

import hashlib
import sys

import pytest

from easy_context.world import real_text


def test_pydoc_is_prose_from_the_standard_library_in_name_order():
    docs = real_text.named_documents("pydoc")
    names = [n for n, _ in docs]
    assert len(docs) > 300 and sum(len(t) for _, t in docs) > 1_000_000  # a corpus, not a sample
    modules = [n for n in names if not n.startswith("topic:")]
    assert modules == sorted(modules) and "json.decoder" in modules and "topic:while" in names
    assert not any(n.split(".")[0] in ("test", "idlelib", "tkinter") for n in modules)
    text = dict(docs)["json.decoder"]
    assert "JSON" in text and "def " not in text  # docstrings, not code
    assert real_text.documents("pydoc") == [t for _, t in docs]


def test_pydoc_imports_nothing_it_reads():
    real_text.stdlib_documents.cache_clear()  # read it afresh
    before = set(sys.modules)
    real_text.stdlib_documents()
    assert not {"antigravity", "this", "turtle", "smtplib", "xml.dom.minidom"} & (set(sys.modules) - before)


def test_the_splits_partition_the_documents_by_name():
    everything = real_text.named_documents("pydoc")
    train = real_text.named_documents("pydoc", "train")
    heldout = real_text.named_documents("pydoc", "heldout")
    assert sorted(train + heldout) == sorted(everything) and not set(train) & set(heldout)
    assert 0.1 < len(heldout) / len(everything) < 0.3  # HELDOUT_SHARE of them, by hash
    for name, _ in heldout:
        assert hashlib.sha256(name.encode()).digest()[0] < 256 * real_text.HELDOUT_SHARE


def test_corpus_describes_version_split_and_digest():
    text, what = real_text.corpus("pydoc", "heldout")
    assert text == "\n\n".join(real_text.documents("pydoc", "heldout"))
    assert sys.version.split()[0] in what and "heldout" in what
    assert hashlib.sha256(text.encode()).hexdigest()[:16] in what


def test_a_folder_reads_its_text_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("not text")
    assert real_text.named_documents(str(tmp_path)) == [("a.txt", "first"), ("b.txt", "second")]
    text, what = real_text.corpus(str(tmp_path))
    assert text == "first\n\nsecond" and what.startswith(tmp_path.name)


def test_bad_sources_and_splits_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*pydoc"):
        real_text.documents(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no .txt files"):
        real_text.documents(str(tmp_path))
    with pytest.raises(ValueError, match="unknown text split 'test'"):
        real_text.documents("pydoc", "test")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="hold no text"):
        real_text.documents(str(tmp_path))
