"""A convergence study's tables: where each cell's mean curve plateaus ("Convergence", for an ablation whose
manifest declares ``report.plateau``), and how far the runs at the default budget fall short of that plateau
("Default budget vs plateau", against the ablation named by ``report.budget_against``)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .columns import fmt, metric, unit
from .stats import Interval, mean_band, t_interval, welch_difference

#: the curves of a convergence study, one panel each, and the metrics its budget table compares
CONVERGENCE_TAGS = ("val/semantic/t2i/R@1", "val/t2i/R@1", "val/semantic/i2t/R@1", "val/i2t/R@1")
PLATEAU_TOLERANCE = 0.02
BUDGET_TOLERANCE = 0.02  # base.yaml's rule: InfoNCE within 2 points of its own plateau


def plateau_summary(curves: Mapping[str, Mapping[str, list]], tags: Sequence[str] | None = None,
                    tolerance: float = PLATEAU_TOLERANCE) -> list[dict]:
    """Per tag and cell, from the mean curve over seeds (`mean_band`): the final value, the best value and
    its step, and ``plateau_step``, the first step at which the mean curve is within ``tolerance`` (0.02 =
    2 points of recall) of its final value. Rows: tag, cell, n_seeds, final_step, final, best, best_step,
    plateau_step. Works with any number of seeds per cell (1 gives the seed's own curve)."""
    if tags is None:
        tags = list(dict.fromkeys(t for by_tag in curves.values() for t in by_tag))
    rows = []
    for tag in tags:
        for cell, by_tag in curves.items():
            series = [s for s in by_tag.get(tag) or [] if len(s[0])]
            if not series:
                continue
            steps, mean, _ = mean_band(series)
            final = float(mean[-1])
            best = int(np.argmax(mean))
            within = np.flatnonzero(np.abs(mean - final) <= tolerance + 1e-12)
            rows.append(dict(tag=tag, cell=cell, n_seeds=len(series), final_step=int(steps[-1]), final=final,
                             best=float(mean[best]), best_step=int(steps[best]), plateau_step=int(steps[within[0]])))
    return rows


def format_plateau(rows: Sequence[dict], tolerance: float = PLATEAU_TOLERANCE) -> str:
    """The "Convergence" markdown section: one table per metric ("" without rows)."""
    if not rows:
        return ""
    lines = ["## Convergence", "",
             f"Mean curve over seeds per cell: its final value, its best value (and step), and the first step at "
             f"which it comes within {100 * tolerance:.0f} points of its final value."]
    for tag in dict.fromkeys(r["tag"] for r in rows):
        m = metric(tag)
        lines += ["", f"### {m.label}{unit(m)}", "",
                  f"| cell | seeds | final step | final | best | best at step | within {100 * tolerance:.0f} points "
                  "from step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["tag"] == tag):
            lines.append(f"| `{r['cell']}` | {r['n_seeds']} | {r['final_step']} | {fmt(r['final'], m)} | "
                         f"{fmt(r['best'], m)} | {r['best_step']} | {r['plateau_step']} |")
    return "\n".join(lines) + "\n"


def budget_gaps(plateau: Mapping[str, Mapping[int, Mapping[str, float]]],
                default: Mapping[str, Mapping[int, Mapping[str, float]]],
                keys: Sequence[str] = CONVERGENCE_TAGS) -> list[dict]:
    """Per cell present in both: the default-budget runs' final value, the long runs' final value (the
    plateau) and plateau − default with Welch's interval (the two are different runs, so no pairing), per key."""
    rows = []
    for cell in plateau:
        if cell not in default or not plateau[cell] or not default[cell]:
            continue
        row: dict = {"cell": cell}
        for key in keys:
            p = [m[key] for m in plateau[cell].values() if key in m]
            d = [m[key] for m in default[cell].values() if key in m]
            if p and d:
                row[key] = (t_interval(d), t_interval(p), welch_difference(p, d))
        rows.append(row)
    return rows


def format_budget(rows: Sequence[dict], default_name: str, keys: Sequence[str] = CONVERGENCE_TAGS,
                  tolerance: float = BUDGET_TOLERANCE) -> str:
    """The "Default budget vs plateau" markdown section ("" without rows)."""
    if not rows:
        return ""

    def iv(i: Interval) -> str:
        if not math.isfinite(i.mean):
            return ""
        return f"{100 * i.mean:.1f}" + (f" ± {100 * i.half_width:.1f}" if math.isfinite(i.half_width) else "")

    def gap(i: Interval) -> str:
        text = f"{100 * i.mean:+.1f}"
        return text + (f" [{100 * i.low:.1f}, {100 * i.high:.1f}]" if math.isfinite(i.low) else "")

    out = ["## Default budget vs plateau",
           "",
           f"Final values of the default-budget runs (`runs/{default_name}`) against the same family's runs at "
           f"this study's budget (the plateau); gap = plateau − default, Welch's 95% interval where both have "
           f"two seeds or more. base.yaml's rule: InfoNCE's gap at most {100 * tolerance:.0f} points.",
           "",
           "| cell | " + " | ".join(f"{metric(k).label} default | plateau | gap" for k in keys) + " |",
           "|---|" + "---:|---:|---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            if k in r:
                d, p, g = r[k]
                cells += [iv(d), iv(p), gap(g)]
            else:
                cells += ["", "", ""]
        out.append(f"| `{r['cell']}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
