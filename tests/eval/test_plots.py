"""plots.py: figures land at their path whole or not at all (temporary file, then os.replace), as the results do;
the perplexity plot has a log2 length axis in tokens, a short title with the protocol as a caption, y limits that
never make a 1% wobble a cliff and a legend off the points; small needle grids carry each cell's score, readable,
large ones none. The figures are inspected as saved by the public functions (a spy on Figure.savefig)."""

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


PROTOCOL = ("protocol=truncate: each document's first L - 1 tokens after a BOS, one forward pass, every token scored; "
            "perplexity = exp(token-weighted mean NLL over all documents); documents: pg19 (10 documents)")


def _saved_figure(monkeypatch, draw):
    """The one Figure that ``draw()`` saved, drawn (tick labels and layout final)."""
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    draw()
    assert len(saved) == 1
    saved[0].draw_without_rendering()
    return saved[0]


def _ppl_figure(monkeypatch, tmp_path, rows, caption=PROTOCOL):
    from easy_context.eval.plots import perplexity_plot

    fig = _saved_figure(monkeypatch, lambda: perplexity_plot(rows, str(tmp_path / "ppl.png"), caption))
    (ax,) = [a for a in fig.axes if a.lines]
    return fig, ax


def _doubling_rows(values, model="m"):
    return [dict(model=model, length=1024 * 2 ** i, perplexity=p) for i, p in enumerate(values)]


def test_perplexity_plot_has_a_log2_length_axis_in_tokens(tmp_path, monkeypatch):
    fig, ax = _ppl_figure(monkeypatch, tmp_path, _doubling_rows([9.0 - 0.1 * i for i in range(11)]))
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels == ["1K", "2K", "4K", "8K", "16K", "32K", "64K", "128K", "256K", "512K", "1M"]


def test_perplexity_plot_title_is_short_and_the_protocol_is_a_caption(tmp_path, monkeypatch):
    from matplotlib.text import Text

    fig, ax = _ppl_figure(monkeypatch, tmp_path, _doubling_rows([9.0, 8.5, 8.2]))
    titles = [t for t in (fig.get_suptitle(), ax.get_title(), ax.get_title("left"), ax.get_title("right")) if t]
    assert len(titles) == 1 and len(titles[0]) <= 40 and "protocol" not in titles[0], titles
    shown = " ".join(t.get_text().replace("\n", " ") for t in fig.findobj(Text))
    assert PROTOCOL in shown  # still on the figure, under it


@pytest.mark.parametrize("values", [[10.0, 10.05, 10.1, 10.02], [3.0, 3.0, 3.0], [1000.0, 1001.0]])
def test_perplexity_plot_y_range_is_never_too_tight(tmp_path, monkeypatch, values):
    _, ax = _ppl_figure(monkeypatch, tmp_path, _doubling_rows(values))
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "linear"
    assert high - low >= 0.2 * max(values)  # plots.PPL_MIN_Y_SPAN, the stated minimum
    assert low <= min(values) and max(values) <= high


def test_perplexity_plot_y_axis_is_logarithmic_over_a_decade_and_shows_every_point(tmp_path, monkeypatch):
    values = [7.0, 7.5, 20.0, 300.0, float("inf")]
    _, ax = _ppl_figure(monkeypatch, tmp_path, _doubling_rows(values))
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low <= 7.0 and 300.0 <= high


def test_perplexity_plot_legend_covers_no_point(tmp_path, monkeypatch):
    import numpy as np

    rows = _doubling_rows([5.0 + i for i in range(8)], "org/a-long-model-name-7B") + \
        _doubling_rows([12.0 - i for i in range(8)], "b") + _doubling_rows([8.0] * 8, "c")
    fig, ax = _ppl_figure(monkeypatch, tmp_path, rows)
    legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
    assert len(legends) == 1
    box = legends[0].get_window_extent()
    for line in ax.lines:
        for x, y in ax.transData.transform(np.asarray(line.get_xydata())):
            assert not box.contains(x, y), (line.get_label(), x, y)


def _needle_figure(monkeypatch, tmp_path, records, value=None):
    from easy_context.eval.plots import needle_heatmap

    fig = _saved_figure(monkeypatch, lambda: needle_heatmap(records, str(tmp_path / "n.png"), "t", value=value))
    (ax,) = [a for a in fig.axes if a.collections and a.get_xlabel()]  # the heatmap, not the colour bar
    return ax


def _grid(lengths, depths, score):
    return [dict(length=n, depth=float(d), sample=0, number="1234567", predicted="1234567", correct=score(n, d))
            for n in lengths for d in depths]


def _contrast(a, b) -> float:
    from matplotlib.colors import to_rgb

    def luminance(colour):
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(a), luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_small_needle_grid_has_each_scored_cell_annotated_readably(tmp_path, monkeypatch):
    from matplotlib.colors import LinearSegmentedColormap

    from easy_context.eval.plots import NEEDLE_COLORS

    lengths = (1024, 2048, 4096)
    records = _grid(lengths, (0, 50, 100), lambda n, d: {0: 0.0, 50: 0.5, 100: 1.0}[d])
    records = [r for r in records if not (r["length"] == 4096 and r["depth"] == 100.0)]  # a cell never scored
    ax = _needle_figure(monkeypatch, tmp_path, records)
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0"] * 3 + ["0.5"] * 3 + ["1"] * 2)
    cmap = LinearSegmentedColormap.from_list("needle", NEEDLE_COLORS)
    for text in ax.texts:
        cell = cmap(float(text.get_text()))
        assert _contrast(text.get_color(), cell) >= 4.5, (text.get_text(), text.get_color())  # WCAG AA


def test_digits_heatmap_is_annotated_with_its_value(tmp_path, monkeypatch):
    records = _grid((1024, 2048), (0, 100), lambda n, d: False)
    ax = _needle_figure(monkeypatch, tmp_path, records, value=lambda r: 0.25)
    assert [t.get_text() for t in ax.texts] == ["0.25"] * 4


def test_large_needle_grid_has_no_annotations(tmp_path, monkeypatch):
    records = _grid(range(1000, 26000, 1000), range(0, 101, 5), lambda n, d: (n + d) % 3 == 0)
    ax = _needle_figure(monkeypatch, tmp_path, records)
    assert len(ax.texts) == 0


def test_task_heatmap_shows_percent_and_one_row_for_depthless_tasks(tmp_path, monkeypatch):
    from easy_context.eval.plots import task_heatmap

    records = [dict(task="fwe", length=n, depth=None, sample=s, score=v) for n in (1024, 2048)
               for s, v in enumerate((1.0, 0.5 if n == 2048 else 1.0))]
    fig = _saved_figure(monkeypatch, lambda: task_heatmap(records, str(tmp_path / "t.png"), "t"))
    (ax,) = [a for a in fig.axes if a.collections and a.get_xlabel()]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["all"]
    assert sorted(t.get_text() for t in ax.texts) == ["100", "75"]


def test_summary_heatmap_has_a_row_per_task_then_the_average(tmp_path, monkeypatch):
    from easy_context.eval.plots import summary_heatmap

    table = dict(tasks=["needle", "vt"], lengths=[1024, 2048], scores={"needle": {"1024": 100.0, "2048": 50.0},
                                                                      "vt": {"1024": 20.0}},
                 average={"1024": 60.0, "2048": 50.0})
    fig = _saved_figure(monkeypatch, lambda: summary_heatmap(table, str(tmp_path / "s.png"), "t"))
    (ax,) = [a for a in fig.axes if a.collections and a.get_xlabel()]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["needle", "vt", "average"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["100", "50", "20", "60", "50"])  # vt at 2K: blank
