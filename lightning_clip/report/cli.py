"""`python -m lightning_clip.report [--ablation NAME ...]`: the tables and plots of finished ablations."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .settings import CURVE_TAGS
from .write import write_report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.report",
                                description="Tables, confidence intervals and plots of an ablation.")
    p.add_argument("--ablation", nargs="+", metavar="NAME", help="default: every folder of --runs-dir with runs")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--curve-tags", nargs="+", metavar="TAG", default=None,
                   help="scalar tags of the curves plot, one panel each (default: the ablation's manifest, "
                        f"report.curve_tags, else {' '.join(CURVE_TAGS)})")
    a = p.parse_args(argv)
    names = a.ablation or sorted(d.name for d in a.runs_dir.glob("*") if d.is_dir() and list(d.glob("*/seed_*")))
    if not names:
        p.error(f"no ablation runs under {a.runs_dir}")
    for name in names:
        written = write_report(name, a.runs_dir, a.results_dir, plots=not a.no_plots, curve_tags=a.curve_tags)
        print(f"{name}: wrote " + ", ".join(str(x) for x in written.values()))
    return 0
