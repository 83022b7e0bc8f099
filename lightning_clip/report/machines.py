"""The machines behind an ablation's table: each run's ``environment.json`` grouped by setup.

Runs repeat exactly only on the same setup (`lightning_clip.environment`), so a table whose runs come from
several setups, or whose runs were trained before the records existed, says so under the table: a reader
comparing it with another table, or with a re-run, then knows whether a difference of a few tenths can be
the machine's.
"""
from __future__ import annotations

from typing import Mapping

from lightning_clip.environment import UNRECORDED, read_records, setup_key

from .load import Run


def setups_of(runs: Mapping[str, Mapping[int, Run]]) -> dict[str, dict[str, list[int]]]:
    """{setup line: {cell: [seeds]}} over the finished runs of `load.load_runs`; a run resumed on another setup
    is listed under the setups of all its fits, joined by ' then ' (`UNRECORDED` first where its first record
    starts after step 0: those steps were trained somewhere unknown)."""
    out: dict[str, dict[str, list[int]]] = {}
    for cell, by_seed in runs.items():
        for seed in sorted(by_seed):
            records = read_records(by_seed[seed].path)
            unknown_start = bool(records) and int(records[0].get("start_step", 0) or 0) > 0
            keys = list(dict.fromkeys([UNRECORDED] * unknown_start + [setup_key(r) for r in records]))
            key = " then ".join(keys) if keys else UNRECORDED
            out.setdefault(key, {}).setdefault(cell, []).append(seed)
    return out


def _runs(by_cell: dict[str, list[int]]) -> str:
    return "; ".join(f"`{c}` seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for c, s in by_cell.items())


def machine_lines(runs: Mapping[str, Mapping[int, Run]], label: str = "") -> list[str]:
    """Markdown lines: one when every run shares a setup, else a section listing each setup's runs ([] when
    no run is finished). ``label`` names the group of runs where a table has several (default, tuned)."""
    setups = setups_of(runs)
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
