"""Would a half-budget run have picked the same winners? The cells ranked at half and at full budget, and
Kendall's tau between the two rankings (results/<ablation>_ranking.csv and a section of the .md)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .columns import fmt, metric, unit
from .load import Run
from .stats import half_and_full, kendall, rank_cells
from .tables import write_csv

#: metrics whose ranking of the cells is compared at half and full budget (higher is better)
RANKING_TAGS = ("val/t2i/R@1", "val/semantic/t2i/R@1")
RANKING_COLUMNS = ("tag", "cell", "n_seeds", "half_step", "half", "half_rank", "full_step", "full", "full_rank",
                   "kendall_tau", "kendall_p")


def ranking_stability(runs: Mapping[str, Mapping[int, Run]], tags: Sequence[str] = RANKING_TAGS) -> list[dict]:
    """Per tag and cell: the mean over seeds at half and at full budget (`half_and_full` of each seed, half of
    the run's final step), the rank of the cell among the cells at each, and Kendall's tau between the two
    rankings (same on every row of a tag). Rows: RANKING_COLUMNS. Cells without the tag are left out; a tag
    no cell logged gives no rows."""
    rows = []
    for tag in tags:
        per_cell = {}
        for cell, by_seed in runs.items():
            points = [half_and_full(*r.scalars[tag], r.step) for r in by_seed.values()
                      if tag in r.scalars and len(r.scalars[tag][0])]
            if points:
                per_cell[cell] = dict(n_seeds=len(points), half_step=float(np.mean([p[0] for p in points])),
                                      half=float(np.mean([p[1] for p in points])),
                                      full_step=float(np.mean([p[2] for p in points])),
                                      full=float(np.mean([p[3] for p in points])))
        if not per_cell:
            continue
        half = {c: v["half"] for c, v in per_cell.items()}
        full = {c: v["full"] for c, v in per_cell.items()}
        half_rank, full_rank = rank_cells(half), rank_cells(full)
        tau, p = kendall(half, full)
        for cell, v in per_cell.items():
            rows.append(dict(tag=tag, cell=cell, **v, half_rank=half_rank[cell], full_rank=full_rank[cell],
                             kendall_tau=tau, kendall_p=p))
    return rows


def ranking_csv(rows: Sequence[dict]) -> str:
    return write_csv(rows, RANKING_COLUMNS)


def _num(x: float, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _rank(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def format_ranking(rows: Sequence[dict]) -> str:
    """The "Ranking at half and full budget" markdown section ("" without rows)."""
    if not rows:
        return ""
    lines = ["## Ranking at half and full budget", "",
             "Cells ranked by the mean over seeds at half budget (each run's validation nearest to half its final "
             "step) and at full budget (its last validation); rank 1 is best. Kendall's τ compares the two "
             "rankings (1: the same order, −1: reversed); a high τ means a half-budget run would have picked "
             "the same winners."]
    for tag in dict.fromkeys(r["tag"] for r in rows):
        part = [r for r in rows if r["tag"] == tag]
        m = metric(tag)
        lines += ["", f"### {m.label}{unit(m)}", "",
                  "| cell | seeds | step at half | at half | rank at half | step at full | at full | rank at full |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(part, key=lambda r: (r["full_rank"], r["cell"])):
            lines.append(f"| `{r['cell']}` | {r['n_seeds']} | {r['half_step']:.0f} | {fmt(r['half'], m)} | "
                         f"{_rank(r['half_rank'])} | {r['full_step']:.0f} | {fmt(r['full'], m)} | "
                         f"{_rank(r['full_rank'])} |")
        tau, p = part[0]["kendall_tau"], part[0]["kendall_p"]
        lines += ["", f"Kendall's τ = {_num(tau, '.3f')} (p = {_num(p, '.3g')}, {len(part)} cells)."]
    return "\n".join(lines) + "\n"
