"""The tuning stage's report (results/<ablation>_tuning.md and _tuning_importance.png): every trial of every
cell with its setting, the steps it reached (a pruned trial stopped early) and its validation objective, the
chosen trial, and each cell's parameter importances (Optuna's fANOVA over its complete trials).

The grid hands over plain summaries (`grid.tuning.CellStudy.summary`), so the report needs no study."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Mapping, Sequence

from lightning_clip.files import atomic_write

from .plots import save_figure


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def format_tuning(ablation: str, summaries: Sequence[Mapping], settings: Mapping) -> str:
    budget = ", ".join(f"{k} {v if v is not None else 'of the cell'}" for k, v in settings.items() if k != "space")
    lines = [f"# {ablation}: tuning on the validation split", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M}. The same budget for every cell ({budget}; shared "
             f"space: {', '.join(settings.get('space') or ()) or 'none'}); TPE sampler, successive-halving pruner; "
             "objective: plain validation rsum (R@1 + R@5 + R@10 both ways, percent). The chosen trial (**bold**) "
             "is the best one that ran its whole budget; results/" + f"{ablation}_tuning.yaml holds its setting.", ""]
    for s in summaries:
        best = (s.get("best") or {}).get("trial")
        states = [t["state"] for t in s["trials"]]
        failed = [t for t in sorted(s["trials"], key=lambda t: t["trial"]) if t["state"] == "fail"]
        redrawn = ("; failed, not counted (a new trial was drawn in its place): "
                   + "; ".join(f"trial {t['trial']} ({t['failure']})" for t in failed)
                   if failed else "")
        lines += [f"## `{s['cell']}`", "",
                  f"Space: {', '.join(f'`{d}`' for d in s['space'])}. Trials: {len(states) - len(failed)} counted "
                  f"({states.count('complete')} complete, {states.count('pruned')} pruned){redrawn}.", ""]
        keys = list(dict.fromkeys(k for t in s["trials"] for k in t["params"]))
        lines += ["| trial | state | steps | rsum | " + " | ".join(f"`{k}`" for k in keys) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(keys)]
        for t in sorted(s["trials"], key=lambda t: t["trial"]):
            mark = "**" if t["trial"] == best else ""
            rsum = "–" if t["rsum"] is None or not math.isfinite(t["rsum"]) else f"{t['rsum']:.1f}"
            lines.append(f"| {mark}{t['trial']}{mark} | {t['state']} | {t['steps'] or '–'} | {mark}{rsum}{mark} | "
                         + " | ".join(_value(t["params"].get(k, "")) for k in keys) + " |")
        if s.get("importance"):
            lines += ["", "Importance (fANOVA): " + ", ".join(f"`{k}` {v:.2f}" for k, v in s["importance"].items()) + "."]
        lines.append("")
    return "\n".join(lines)


def plot_importance(summaries: Sequence[Mapping]):
    """One small bar chart per cell with importances (None when no cell has any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summaries if s.get("importance")]
    if not shown:
        return None
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, shown):
        names = list(s["importance"])[::-1]
        ax.barh(names, [s["importance"][n] for n in names], color="tab:blue")
        ax.set_title(s["cell"], fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("parameter importance (fANOVA over complete trials)", fontsize=10)
    fig.tight_layout()
    return fig


def write_tuning(ablation: str, summaries: Sequence[Mapping], results_dir="results",
                 settings: Mapping | None = None) -> dict[str, Path]:
    results_dir = Path(results_dir)
    written = {"md": atomic_write(results_dir / f"{ablation}_tuning.md",
                                  format_tuning(ablation, summaries, settings or {}))}
    fig = plot_importance(summaries)
    if fig is not None:
        written["importance"] = save_figure(fig, results_dir / f"{ablation}_tuning_importance.png")
    return written
