"""Figures of the evals: the needle heatmap (EasyContext's colours), the same heatmap per task of the RULER-style suite
and its task x length summary, and the perplexity-vs-length plot.

``needle_figure`` / ``task_figure`` / ``summary_figure`` / ``perplexity_figure`` build a matplotlib Figure (object
API: no pyplot state, no backend switch); ``needle_heatmap`` / ``task_heatmap`` / ``summary_heatmap`` /
``perplexity_plot`` write one to a PNG atomically. matplotlib and seaborn are imported when a figure is drawn.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import defaultdict
from typing import Callable

NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red -> yellow -> green, as EasyContext's heatmaps
ANNOTATE_MAX_CELLS = 20  # needle grids up to this many lengths and depths get each cell's score written in it
PPL_TITLE = "Perplexity vs context length"
PPL_MIN_Y_SPAN = 0.2  # a linear y axis spans at least this fraction of the largest perplexity
PPL_LOG_Y_RATIO = 10.0  # above this max/min ratio (a decade) the y axis is logarithmic
MAX_X_TICKS = 12  # more distinct lengths than this: ticks at the powers of two instead of at every length


def tokens_label(n: float) -> str:
    """A token count as a short label: 1024 -> "1K", 1536 -> "1.5K", 2**20 -> "1M", 1000 -> "1000"."""
    for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
        q = n / size
        if q >= 1 and q == round(q, 2):
            return f"{q:g}{unit}"
    return f"{n:g}"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # Constrained layout keeps room for the colour bar, the legend outside the axes and the caption.
    return Figure(figsize=(width, height), layout="constrained")


def _text_colour(rgba) -> str:
    """Black or white, whichever has the higher WCAG contrast ratio on the colour ``rgba``."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "white" if 1.05 / (luminance + 0.05) > (luminance + 0.05) / 0.05 else "black"


def _save(fig, path: str) -> str:
    # Through a temporary file and os.replace, as the results files: a kill or a full disk mid-write leaves the
    # previous figure (or none), never half a PNG.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _grid_figure(grid, xlabels: list[str], ylabels: list[str], title: str, *, xlabel: str, ylabel: str,
                 vmax: float = 1.0, cbar_label: str = "Score", row_gap: int | None = None):
    """A red (0) -> green (``vmax``) heatmap Figure of ``grid`` (rows x columns, NaN: blank); grids up to
    ``ANNOTATE_MAX_CELLS`` a side have each cell's value written in it, black or white, whichever contrasts more.
    ``row_gap``: a white line above that row (e.g. before an average row)."""
    import numpy as np
    import seaborn as sns
    from matplotlib.colors import LinearSegmentedColormap

    rows, cols = grid.shape
    fig = _figure(min(17.5, 3 + 0.8 * cols + 0.06 * max(map(len, ylabels), default=0)), min(8.0, 2 + 0.45 * rows))
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("needle", NEEDLE_COLORS)
    sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap=cmap, mask=np.isnan(grid), linewidths=0.5, linecolor="white",
                xticklabels=xlabels, yticklabels=ylabels, cbar_kws={"label": cbar_label})
    if max(rows, cols) <= ANNOTATE_MAX_CELLS:
        fontsize = 9 if cols <= 12 else 7
        for (i, j), score in np.ndenumerate(grid):
            if not np.isnan(score):
                ax.text(j + 0.5, i + 0.5, f"{score:.2g}" if vmax == 1 else f"{score:.0f}", ha="center",
                        va="center", fontsize=fontsize, color=_text_colour(cmap(score / vmax)))
    if row_gap is not None:
        ax.axhline(row_gap, color="white", linewidth=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45 if cols > 12 else 0)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(title)
    return fig


def _mean_grid(records: list[dict], value: Callable[[dict], float]):
    """(grid [depths x lengths] of mean values, depths, lengths) of records with a depth and a length."""
    import numpy as np

    scores = defaultdict(list)
    for r in records:
        scores[(r["depth"], int(r["length"]))].append(float(value(r)))
    depths = sorted({d for d, _ in scores}, key=lambda d: (d is not None, d or 0.0))
    lengths = sorted({n for _, n in scores})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), values in scores.items():
        grid[depths.index(d), lengths.index(n)] = sum(values) / len(values)
    return grid, depths, lengths


def needle_figure(records: list[dict], title: str, value: Callable[[dict], float] | None = None):
    """Mean score per (depth, length) of needle records as a heatmap Figure: length on x, depth on y, red (0) ->
    green (1); cells never scored stay blank; grids up to ``ANNOTATE_MAX_CELLS`` a side have each scored cell's
    value written in it, black or white, whichever contrasts more (black on all of EasyContext's colours). The
    score is ``correct`` or ``value(record)``."""
    records = [dict(r, depth=float(r["depth"])) for r in records]
    grid, depths, lengths = _mean_grid(records, value or (lambda r: r["correct"]))
    return _grid_figure(grid, [tokens_label(n) for n in lengths], [f"{d:g}" for d in depths], title,
                        xlabel="Context length (tokens)", ylabel="Needle depth (%)")


def task_figure(records: list[dict], title: str):
    """Mean ``score`` (0-1, shown as percent) per (depth, length) of one task's records as a needle-style heatmap;
    records without a depth (the aggregation tasks) make one row, "all"."""
    grid, depths, lengths = _mean_grid(records, lambda r: 100 * r["score"])
    has_depth = any(d is not None for d in depths)
    return _grid_figure(grid, [tokens_label(n) for n in lengths], ["all" if d is None else f"{d:g}" for d in depths],
                        title, xlabel="Context length (tokens)", ylabel="Evidence depth (%)" if has_depth else "",
                        vmax=100.0, cbar_label="Score (%)")


def task_heatmap(records: list[dict], path: str, title: str) -> str:
    """Write ``task_figure(records, title)`` to the PNG ``path`` atomically. Returns ``path``."""
    return _save(task_figure(records, title), path)


def summary_figure(table: dict, title: str, ylabel: str = "Task"):
    """A row x length heatmap of a suite summary (``eval.ruler.summary``: scores 0-100 per task and length, or
    ``eval.ruler.comparison``: per model), rows in order, then their average when the table has one; each cell
    annotated when the grid is small."""
    import numpy as np

    rows, lengths = table["tasks"], table["lengths"]
    values = [[table["scores"][t].get(str(n), np.nan) for n in lengths] for t in rows]
    labels = list(rows)
    if table.get("average"):
        values.append([table["average"].get(str(n), np.nan) for n in lengths])
        labels.append("average")
    grid = np.array(values, dtype=float)
    return _grid_figure(grid, [tokens_label(n) for n in lengths], labels, title, xlabel="Context length (tokens)",
                        ylabel=ylabel, vmax=100.0, cbar_label="Score (%)",
                        row_gap=len(rows) if table.get("average") else None)


def summary_heatmap(table: dict, path: str, title: str, ylabel: str = "Task") -> str:
    """Write ``summary_figure(table, title, ylabel)`` to the PNG ``path`` atomically. Returns ``path``."""
    return _save(summary_figure(table, title, ylabel), path)


def needle_heatmap(records: list[dict], path: str, title: str,
                   value: Callable[[dict], float] | None = None) -> str:
    """Write ``needle_figure(records, title, value)`` to the PNG ``path`` atomically. Returns ``path``."""
    return _save(needle_figure(records, title, value), path)


def perplexity_figure(rows: list[dict], caption: str = "", title: str = PPL_TITLE):
    """Perplexity against length, one line per ``model`` in ``rows`` (dicts with model, length, perplexity), as a
    Figure. x: log2, ticks in tokens (1K, 2K, ... 1M). y: logarithmic when the finite values span more than
    ``PPL_LOG_Y_RATIO`` x, else linear and at least ``PPL_MIN_Y_SPAN`` of the largest value tall, so a 1% wobble
    never looks like a cliff. The legend sits above the axes; ``caption`` (the protocol) goes under them."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    lines = defaultdict(list)
    for r in rows:
        lines[r["model"]].append((int(r["length"]), float(r["perplexity"])))
    fig = _figure(10, 5)
    ax = fig.add_subplot()
    for model, points in lines.items():
        points.sort()
        ax.plot([n for n, _ in points], [p for _, p in points], marker="o", label=model)

    lengths = sorted({n for points in lines.values() for n, _ in points})
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xlim(lengths[0] / 2 ** 0.4, lengths[-1] * 2 ** 0.4)
    ax.xaxis.set_major_locator(FixedLocator(lengths) if len(lengths) <= MAX_X_TICKS else LogLocator(base=2))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tokens_label(x)))

    finite = [p for points in lines.values() for _, p in points if math.isfinite(p) and p > 0]
    if finite and max(finite) / min(finite) > PPL_LOG_Y_RATIO:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        # Of the minor ticks (2..9 x 10^k), the 2s and 5s are labelled: 1, 2, 5, 10, 20, 50, ...
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
    elif finite:
        low, high = min(finite), max(finite)
        span = max(high - low, PPL_MIN_Y_SPAN * high) * 1.1  # 5% margin each side, as autoscale
        middle = (low + high) / 2
        ax.set_ylim(max(0.0, middle - span / 2), middle + span / 2)

    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Perplexity (lower is better)")
    fig.suptitle(title)
    ax.grid(alpha=0.3)
    if lines:  # just above the axes, under the title: never over a point
        per_row = max(1, min(len(lines), 3, 100 // (max(len(str(m)) for m in lines) + 6)))  # fits 10 inches
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=per_row, fontsize=9, frameon=False)
    if caption:  # a figure-level label under the axes: constrained layout keeps room for it
        fig.supxlabel("\n".join(textwrap.wrap(caption, 140)), fontsize=8, color="0.3")
    return fig


def perplexity_plot(rows: list[dict], path: str, caption: str = "", title: str = PPL_TITLE) -> str:
    """Write ``perplexity_figure(rows, caption, title)`` to the PNG ``path`` atomically. Returns ``path``."""
    return _save(perplexity_figure(rows, caption, title), path)
