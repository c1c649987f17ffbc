"""plots.py: figures land at their path whole or not at all (temporary file, then os.replace), as the results do."""

from __future__ import annotations

import os

import pytest


def _records():
    return [dict(length=n, depth=d, sample=0, number="1234567", predicted="1234567", correct=d < 50)
            for n in (256, 512) for d in (0.0, 50.0, 100.0)]


def _rows():
    return [dict(model=m, length=n, perplexity=p) for m, p in (("a", 10.0), ("b", 12.0)) for n in (256, 512)]


@pytest.mark.parametrize("draw", ["needle", "perplexity"])
def test_a_failed_save_leaves_the_previous_figure_and_no_partial_file(tmp_path, monkeypatch, draw):
    from matplotlib.figure import Figure

    from easy_context.eval.plots import needle_heatmap, perplexity_plot

    path = str(tmp_path / "out" / "fig.png")
    plot = (lambda: needle_heatmap(_records(), path, "t")) if draw == "needle" else \
        (lambda: perplexity_plot(_rows(), path, "t"))
    assert plot() == path
    before = open(path, "rb").read()
    assert before.startswith(b"\x89PNG")

    def killed_while_writing(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", killed_while_writing)
    with pytest.raises(OSError, match="disk full"):
        plot()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path / "out") == ["fig.png"]  # no temporary file left behind
