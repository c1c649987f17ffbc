"""Figures of the evals: the needle heatmap (EasyContext's colours) and the perplexity-vs-length plot.

matplotlib (Agg backend, no display needed) and seaborn are imported when a figure is drawn.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import defaultdict

NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # red -> yellow -> green, as EasyContext's heatmaps


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    # Through a temporary file and os.replace, as the results files: a kill or a full disk mid-write leaves the
    # previous figure (or none), never half a PNG.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def needle_heatmap(records: list[dict], path: str, title: str, value=None) -> str:
    """Mean score per (depth, length) of needle records as a heatmap PNG: length on x, depth on y, red (0) ->
    green (1); cells never scored stay blank. The score is ``correct`` or ``value(record)``. Returns ``path``."""
    import numpy as np
    import seaborn as sns
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    scores = defaultdict(list)
    for r in records:
        scores[(float(r["depth"]), int(r["length"]))].append(float(r["correct"] if value is None else value(r)))
    depths = sorted({d for d, _ in scores})
    lengths = sorted({n for _, n in scores})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), values in scores.items():
        grid[depths.index(d), lengths.index(n)] = sum(values) / len(values)
    fig = plt.figure(figsize=(min(17.5, 3 + 0.8 * len(lengths)), min(8.0, 2 + 0.45 * len(depths))))
    cmap = LinearSegmentedColormap.from_list("needle", NEEDLE_COLORS)
    sns.heatmap(grid, vmin=0, vmax=1, cmap=cmap, mask=np.isnan(grid), linewidths=0.5, linecolor="white",
                xticklabels=lengths, yticklabels=[f"{d:g}" for d in depths], cbar_kws={"label": "Score"})
    plt.xlabel("Context length (tokens)")
    plt.ylabel("Needle depth (%)")
    plt.xticks(rotation=45)
    plt.yticks(rotation=0)
    plt.title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def perplexity_plot(rows: list[dict], path: str, title: str) -> str:
    """Perplexity against length, one line per ``model`` in ``rows`` (dicts with model, length, perplexity)
    as a PNG. Returns ``path``."""
    plt = _pyplot()
    lines = defaultdict(list)
    for r in rows:
        lines[r["model"]].append((int(r["length"]), float(r["perplexity"])))
    fig = plt.figure(figsize=(10, 5))
    for model, points in lines.items():
        points.sort()
        plt.plot([n for n, _ in points], [p for _, p in points], marker="o", label=model)
    finite = [p for points in lines.values() for _, p in points if math.isfinite(p)]
    if finite and max(finite) / max(min(finite), 1e-12) > 20:
        plt.yscale("log")
    plt.xlabel("Context length (tokens)")
    plt.ylabel("Perplexity (lower is better)")
    plt.title("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    plt.grid(alpha=0.3)
    plt.legend(loc="upper right")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
