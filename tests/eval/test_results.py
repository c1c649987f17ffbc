"""The results store both evals share: a reopened file with the same settings resumes its records (saved fields
kept), other settings raise naming what differs and what to do; JSON and CSV are written whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from easy_context.eval.results import ResultsFile, settings_diff, write_csv


def test_settings_diff_names_each_difference():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == "b: 2 there, 3 now"
    assert settings_diff({"a": 1}, {"a": 1, "c": 4}) == "c: None there, 4 now"


def test_results_file_resumes_and_refuses_other_settings(tmp_path):
    path = str(tmp_path / "out" / "r.json")
    settings = {"seed": 0, "lengths": (256, 512)}  # a tuple reads back as a list: still the same settings
    store = ResultsFile(path, settings, key="cells", remedy="pick another file")
    assert store.records == [] and store.saved == {}
    store.records.append({"x": 1})
    store.save(header="h")
    again = ResultsFile(path, dict(settings), key="cells", remedy="pick another file")
    assert again.records == [{"x": 1}] and again.saved["header"] == "h"
    with open(path) as f:
        assert list(json.load(f)) == ["settings", "header", "cells"]
    with pytest.raises(ValueError, match=r"different settings \(seed: 0 there, 1 now\); pick another file"):
        ResultsFile(path, {**settings, "seed": 1}, key="cells", remedy="pick another file")
    assert os.listdir(tmp_path / "out") == ["r.json"]  # no temp file left behind


def test_csv_columns_header_and_missing_values(tmp_path):
    path = write_csv(str(tmp_path / "d" / "t.csv"), [{"a": 1, "b": 2, "extra": 3}, {"a": 4}], ["a", "b"],
                     header="how")
    with open(path) as f:
        assert f.read().splitlines() == ["# how", "a,b", "1,2", "4,"]
    write_csv(path, [{"a": 5}], ["a"])  # no header line; the old file replaced whole
    with open(path) as f:
        assert f.read().splitlines() == ["a", "5"]
    assert os.listdir(tmp_path / "d") == ["t.csv"]
