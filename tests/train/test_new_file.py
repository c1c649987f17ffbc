"""new_file.py: a file is published whole, and never over one that exists."""

from __future__ import annotations

import os

import pytest

from easy_context.train.new_file import create_new


def fails_halfway(f):
    f.write(b"half")
    raise RuntimeError("the disk is full")


def test_a_file_is_written_whole_and_never_over_one_that_appeared_meanwhile(tmp_path):
    path = str(tmp_path / "step.pickle")
    assert create_new(path, lambda f: f.write(b"snapshot"))
    assert not create_new(path, lambda f: f.write(b"another"))
    assert open(path, "rb").read() == b"snapshot"
    with pytest.raises(RuntimeError, match="the disk is full"):
        create_new(str(tmp_path / "half.pickle"), fails_halfway)
    assert sorted(os.listdir(tmp_path)) == ["step.pickle"]  # no half file, no temporary left


def test_without_hard_links_the_file_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    path = str(tmp_path / "run.lock")
    assert create_new(path, lambda f: f.write(b"first"))
    assert not create_new(path, lambda f: f.write(b"second"))
    assert open(path, "rb").read() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]
