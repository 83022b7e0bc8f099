"""`python -m lightning_clip.report [--ablation NAME ...]`: the tables and plots of finished ablations; for a
design ablation on the test split (its manifest's `test_split`) the validation table is `<name>_val` and the
test-split table `<name>`, as the runner writes them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .load import read_manifest
from .settings import CURVE_TAGS
from .test_split import write_test
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
        test = read_manifest(a.runs_dir / name).get("test_split")  # a design ablation on the fair protocol
        written = write_report(name, a.runs_dir, a.results_dir, plots=not a.no_plots, curve_tags=a.curve_tags,
                               out=f"{name}_val" if test else None)
        if test:
            written |= {f"test {k}": v for k, v in write_test(name, a.runs_dir, a.results_dir,
                                                             margin=test["margin"]).items()}
        print(f"{name}: wrote " + ", ".join(str(x) for x in written.values()))
    return 0
