"""The machines behind an ablation's table: each run's ``environment.json`` grouped by setup.

Runs repeat exactly only on the same setup (`lightning_clip.environment`), so a table whose runs come from
several setups, or whose runs were trained before the records existed, says so under the table: a reader
comparing it with another table, or with a re-run, then knows whether a difference of a few tenths can be
the machine's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from lightning_clip.environment import UNRECORDED, read_records, setup_key


def setups_of(ablation_dir: str | os.PathLike, cells: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """{setup line: {cell: [seeds]}} over the finished runs (those with final_metrics.json); a run resumed on
    another setup is listed under the setups of all its fits, joined by ' then ' (`UNRECORDED` first where its
    first record starts after step 0: those steps were trained somewhere unknown)."""
    out: dict[str, dict[str, list[int]]] = {}
    for cell in cells:
        found = [(int(m.group(1)), p) for p in Path(ablation_dir, cell).glob("seed_*")
                 if (m := re.fullmatch(r"seed_(\d+)", p.name, re.ASCII))]
        for seed, run_dir in sorted(found):
            if not (run_dir / "final_metrics.json").exists():
                continue
            records = read_records(run_dir)
            unknown_start = bool(records) and int(records[0].get("start_step", 0) or 0) > 0
            keys = list(dict.fromkeys([UNRECORDED] * unknown_start + [setup_key(r) for r in records]))
            key = " then ".join(keys) if keys else UNRECORDED
            out.setdefault(key, {}).setdefault(cell, []).append(seed)
    return out


def _runs(by_cell: dict[str, list[int]]) -> str:
    return "; ".join(f"`{c}` seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for c, s in by_cell.items())


def machine_lines(ablation_dir: str | os.PathLike, cells: Sequence[str], label: str = "") -> list[str]:
    """Markdown lines: one when every run shares a setup, else a section listing each setup's runs ([] when
    no run is finished). ``label`` names the group of runs where a table has several (default, tuned)."""
    setups = setups_of(ablation_dir, cells)
    if not setups:
        return []
    n = sum(len(s) for by_cell in setups.values() for s in by_cell.values())
    if len(setups) == 1:
        (key,) = setups
        head = f"Machine{label and f' ({label})'}:"
        if key == UNRECORDED:
            return [f"{head} not recorded for the {n} run{'s' * (n > 1)} (trained before runs kept environment.json)."]
        return [f"{head} {'all ' * (n > 1)}{n} run{'s' * (n > 1)} trained on {key}."]
    lines = [f"## Machines{label and f': {label}'}", "",
             f"The {n} runs were trained on {len(setups)} setups (`environment.json` in each run folder). A run "
             "repeats its figures exactly only on its own setup: float reductions differ with the CPU kernels, "
             "threads and library versions, so differences between runs of different setups include the "
             "machine's.", "", "| setup | runs |", "|---|---|"]
    lines += [f"| {key} | {_runs(by_cell)} |" for key, by_cell in setups.items()]
    return lines
