"""One walk over an ablation's runs: runs/<ablation>/<cell>/seed_<k>/ with final_metrics.json (a run counts
once that file exists: the results callback writes it atomically at the end), eval.json (the evaluation
suite's scalars) and the TensorBoard event files beside them."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class Run:
    """One finished run. ``metrics``: the numbers of final_metrics.json (`loss_family` and other strings
    dropped) and of eval.json; ``step``: its final step; ``scalars``: {tag: (steps, values)} of the tags asked
    for that its event files hold."""
    cell: str
    seed: int
    path: Path
    metrics: dict[str, float]
    step: float | None
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]


def read_manifest(ablation_dir: str | os.PathLike) -> dict:
    """cells (in order), baseline, descriptions and the report settings: runs/<ablation>/ablation.json from
    the runner, else the cell folders in alphabetical order with no baseline."""
    ablation_dir = Path(ablation_dir)
    try:
        return json.loads((ablation_dir / "ablation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cells = sorted(p.name for p in ablation_dir.glob("*") if p.is_dir() and any(p.glob("seed_*")))
        return dict(ablation=ablation_dir.name, baseline=None, cells=[dict(name=c, description="") for c in cells])


def seed_of(path: Path) -> int | None:
    """k of a run folder named seed_<k> (ASCII digits only); None for any other folder (a copy put aside)."""
    m = re.fullmatch(r"seed_([0-9]+)", path.name)
    return int(m.group(1)) if m else None


def load_runs(ablation_dir: str | os.PathLike, cells: Sequence[str] | None = None,
              tags: Sequence[str] = ()) -> dict[str, dict[int, Run]]:
    """{cell: {seed: Run}} for every cell (the manifest's by default; a cell without finished runs maps to
    {}). Event files are read only when ``tags`` asks for curves."""
    ablation_dir = Path(ablation_dir)
    if cells is None:
        cells = [c["name"] for c in read_manifest(ablation_dir)["cells"]]
    out: dict[str, dict[int, Run]] = {}
    for cell in cells:
        out[cell] = {}
        for run_dir in sorted((ablation_dir / cell).glob("seed_*")):
            seed, path = seed_of(run_dir), run_dir / "final_metrics.json"
            if seed is None or not path.exists():
                continue
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            step = metrics.get("step")
            if (run_dir / "eval.json").exists():
                from lightning_clip.eval.records import read_flat

                metrics.update(read_flat(run_dir / "eval.json"))
            out[cell][seed] = Run(cell, seed, run_dir, metrics, step, load_scalars(run_dir, tags) if tags else {})
    return out


def load_scalars(run_dir: str | os.PathLike, tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} from the TensorBoard event files of one run (tags it lacks are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in have:
            events = acc.Scalars(tag)
            out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return out


def metrics_of(runs: Mapping[str, Mapping[int, Run]]) -> dict[str, dict[int, dict[str, float]]]:
    """{cell: {seed: {key: value}}}: the shape the tables work on."""
    return {cell: {seed: run.metrics for seed, run in by_seed.items()} for cell, by_seed in runs.items()}


def curves_of(runs: Mapping[str, Mapping[int, Run]], tags: Sequence[str]) -> dict[str, dict[str, list]]:
    """{cell: {tag: [(steps, values) per seed, in seed order]}}, tags no seed of the cell logged left out."""
    return {cell: {tag: [by_seed[s].scalars[tag] for s in sorted(by_seed) if tag in by_seed[s].scalars]
                   for tag in tags if any(tag in r.scalars for r in by_seed.values())}
            for cell, by_seed in runs.items()}
