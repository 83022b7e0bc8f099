"""`write_report`: every table and figure of one ablation into results/, each file written atomically (an
interruption leaves the previous version, never half a table)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Sequence

from lightning_clip.files import atomic_write

from . import plots as figures  # the module; `plots` is write_report's switch
from .budget import budget_gaps, format_budget, format_plateau, plateau_summary
from .load import curves_of, load_runs, metrics_of, read_manifest
from .machines import machine_lines
from .ranking import RANKING_TAGS, format_ranking, ranking_csv, ranking_stability
from .settings import settings_of
from .tensorboard import write_tensorboard
from .tables import format_markdown, series_differences, summarize, to_csv


def _machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def write_report(ablation: str, runs_dir: str | os.PathLike = "runs", results_dir: str | os.PathLike = "results",
                 *, plots: bool = True, curve_tags: Sequence[str] | None = None,
                 out: str | None = None) -> dict[str, Path]:
    """Everything for one ablation; returns {kind: path} of what it wrote (csv, md, and where there is
    something to show: ranking, bars, curves). The curves' panels, the plateau table and the budget table
    are what the ablation's manifest declares (`settings`); ``curve_tags`` overrides the panels. ``out``
    names the files (default: the ablation's name)."""
    ablation_dir = Path(runs_dir) / ablation
    if not ablation_dir.is_dir():
        raise FileNotFoundError(f"no runs for ablation '{ablation}': {ablation_dir} does not exist")
    manifest = read_manifest(ablation_dir)
    settings = settings_of(manifest)
    cells = [c["name"] for c in manifest["cells"]]
    curve_tags = tuple(curve_tags) if curve_tags is not None else settings.curve_tags
    runs = load_runs(ablation_dir, cells, tuple(dict.fromkeys((*curve_tags, *RANKING_TAGS))))
    metrics = metrics_of(runs)
    if not any(metrics.values()):
        raise FileNotFoundError(f"no finished run under {ablation_dir} (no */seed_*/final_metrics.json)")
    baseline = manifest.get("baseline")
    rows = summarize(metrics, baseline, {c["name"]: c.get("description", "") for c in manifest["cells"]})
    ranking = ranking_stability(runs)
    curves = curves_of(runs, curve_tags)

    sections = []
    if settings.plateau:
        sections.append(format_plateau(plateau_summary(curves, curve_tags)))
    default_dir = Path(runs_dir) / settings.budget_against if settings.budget_against else None
    if default_dir is not None and default_dir.is_dir():
        default = metrics_of(load_runs(default_dir, [c for c in cells if (default_dir / c).is_dir()]))
        sections.append(format_budget(budget_gaps(metrics, default), settings.budget_against))
    sections.append(format_ranking(ranking))
    sections.append("\n".join(machine_lines(runs)))
    stamp = f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} on {_machine()}."
    md = format_markdown(rows, ablation, source=ablation_dir.as_posix(), stamp=stamp,
                         series=series_differences(metrics, baseline), sections=sections)

    # the ablation's TensorBoard page (summary runs, layout, hparams sessions) under runs/<ablation>/
    write_tensorboard(ablation, ablation_dir, manifest, runs)
    results_dir = Path(results_dir)
    ablation = out or ablation
    written = {
        "csv": atomic_write(results_dir / f"{ablation}.csv", to_csv(rows)),
        "md": atomic_write(results_dir / f"{ablation}.md", md),
    }
    if ranking:
        written["ranking"] = atomic_write(results_dir / f"{ablation}_ranking.csv", ranking_csv(ranking))
    if plots:
        bars = figures.plot_bars(rows, title=ablation)
        written["bars"] = figures.save_figure(bars, results_dir / f"{ablation}_bars.png")
        if any(curves.values()):
            fig = figures.plot_curves(curves, baseline=baseline, title=ablation, tags=curve_tags)
            written["curves"] = figures.save_figure(fig, results_dir / f"{ablation}_curves.png")
    return written
