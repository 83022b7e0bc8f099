"""The report's figures: curves against step (mean over seeds with a band) and bars per cell with intervals.
Figures are built with matplotlib's Figure, not pyplot: no global state and no display backend, so the
runner can draw them in any process."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lightning_clip.files import atomic_write

from .columns import col, metric, series_of, unit
from .settings import CURVE_TAGS
from .stats import CONFIDENCE, mean_band
from .tables import keys_of

TAG_LABELS = {"val/t2i/R@1": ("validation t2i R@1 (%)", 100.0), "train/loss": ("training loss", 1.0),
              "val/i2t/R@1": ("validation i2t R@1 (%)", 100.0),
              "val/semantic/t2i/R@1": ("validation semantic t2i R@1 (%)", 100.0),
              "val/semantic/i2t/R@1": ("validation semantic i2t R@1 (%)", 100.0)}


def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _colors(cells: Sequence[str], baseline: str | None) -> dict[str, object]:
    from matplotlib import colormaps

    others = [c for c in cells if c != baseline]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(others)}
    if baseline:
        colors[baseline] = "black"
    return colors


def plot_curves(curves: Mapping[str, Mapping[str, list]], *, baseline: str | None = None, title: str = "",
                tags: Sequence[str] = CURVE_TAGS):
    """One panel per tag, one line per cell (mean over seeds) with a ±1 s.d. band; the baseline in black.
    ``curves``: `load.curves_of`'s {cell: {tag: [(steps, values) per seed]}}."""
    fig, axes = _figure(len(tags))
    colors = _colors(list(curves), baseline)
    for ax, tag in zip(axes, tags):
        label, scale = TAG_LABELS.get(tag, (tag, 1.0))
        for cell, by_tag in curves.items():
            if not by_tag.get(tag):
                continue
            steps, mean, std = mean_band(by_tag[tag])
            n = len(by_tag[tag])
            lw = 2.4 if cell == baseline else 1.5
            ax.plot(steps, mean * scale, color=colors[cell], lw=lw, marker="o" if len(steps) < 8 else None, ms=3,
                    label=f"{cell}{' (baseline)' if cell == baseline else ''} (n={n})")
            if n > 1:
                ax.fill_between(steps, (mean - std) * scale, (mean + std) * scale, color=colors[cell], alpha=0.15, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes:
            ax.text(0.5, 0.5, "no TensorBoard scalars found", ha="center", va="center", transform=ax.transAxes)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, band ±1 s.d.")
    return fig


def plot_bars(rows: Sequence[dict], *, title: str = "", keys: Sequence[str] | None = None):
    """R@1 (and the variance correlations where present) per cell with 95% intervals as error bars; the
    baseline's mean as a dashed line. Cells that form series over a number are grouped by that number."""
    if keys is None:
        wanted = ["val/t2i/R@1", "val/i2t/R@1", "val/semantic/t2i/R@1", "variance/text/spearman_specificity",
                  "variance/image/spearman_num_objects"]
        have = set(keys_of(rows))
        keys = [k for k in wanted if k in have] or ["val/t2i/R@1"]
    fig, axes = _figure(len(keys), width=max(4.5, 0.55 * len(rows) + 2.5) if len(keys) < 3 else 5.0, height=4.6)
    cells = [r["cell"] for r in rows]
    baseline = next((r["cell"] for r in rows if r.get("baseline")), None)
    colors = _colors(cells, baseline)
    grouped = series_of(cells)
    for ax, key in zip(axes, keys):
        m = metric(key)
        mean = np.array([r.get(col(key, "mean"), np.nan) for r in rows]) * m.scale
        err = np.array([(r[col(key, "ci_high")] - r[col(key, "ci_low")]) / 2 if col(key, "ci_high") in r
                        else 0.0 for r in rows]) * m.scale
        if grouped:
            mapping, xlabel = grouped
            series = list(dict.fromkeys(s for s, _ in mapping.values()))
            xs = sorted({x for _, x in mapping.values()})
            width = 0.8 / len(series)
            scolors = _colors(series, None)
            for j, s in enumerate(series):
                idx = [i for i, c in enumerate(cells) if mapping[c][0] == s]
                pos = [xs.index(mapping[cells[i]][1]) - 0.4 + width * (j + 0.5) for i in idx]
                ax.bar(pos, mean[idx], width, yerr=err[idx], capsize=3, color=scolors[s], label=s)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.legend(fontsize="small", frameon=False)
        else:
            ax.bar(range(len(cells)), mean, 0.7, yerr=err, capsize=3, color=[colors[c] for c in cells])
            ax.set_xticks(range(len(cells)), cells, rotation=35, ha="right", fontsize="small")
            if baseline is not None:
                b = cells.index(baseline)
                if np.isfinite(mean[b]):
                    ax.axhline(mean[b], color="black", ls="--", lw=1, label=f"baseline {baseline}")
                    ax.legend(fontsize="small", frameon=False)
        label = m.label + unit(m)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, error bars {int(CONFIDENCE * 100)}% t-interval")
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """The figure as a PNG at ``path``, written atomically (a reader never sees half an image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write(path, buf.getvalue())
