"""The runs of an ablation: each run's arguments, its fingerprint (what makes two runs equal) and the order
the runner starts them in.

A run is `python -m lightning_clip fit --config base.yaml --config <cell>.yaml [--config quick.yaml]
--seed_everything=<k> [data arguments] [extra arguments] --run_dir=<runs>/<ablation>/<cell>/seed_<k>`.
Its fingerprint hashes the parsed configs, the seed and the arguments, not the run folder: two cells
with equal configs (the `variance` ablation repeats cells of `losses`) are the same run, computed once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import yaml


from lightning_clip.grid.cells import Ablation, Cell

BASE_CONFIG = Path("experiments/base.yaml")
QUICK_CONFIG = Path("experiments/quick.yaml")


@dataclasses.dataclass
class Run:
    cell: Cell
    seed: int
    run_dir: Path
    args: list[str]          # everything after the command prefix
    fingerprint: str
    #: training samples (max_steps x batch size): the runner starts the longest runs first
    cost: int = 0

    @property
    def label(self) -> str:
        return f"{self.cell.ablation}/{self.cell.name} seed {self.seed}"


def canonical_config(path: Path) -> object:
    # parsed, so that editing a comment does not invalidate finished runs
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML: {e}") from None


def plan_runs(ablation: Ablation, seeds: Sequence[int], runs_dir: Path, *, base: Path = BASE_CONFIG,
              quick_config: Path | None = None, extra: Sequence[str] = (),
              environ: Mapping[str, str] = os.environ, log=print, per_cell_seeds: bool = False) -> list[Run]:
    """The runs of one ablation, seed-major (all cells of seed 0 first: an early table covers every cell).

    With ``per_cell_seeds`` a cell runs only the seeds below its own `# @seeds N` (else the ablation's
    `seeds_per_cell`);
    without, every cell runs every seed given (`--seeds`, `--quick`). A cell whose `# @data` folder is
    absent is skipped with a message."""
    cells = []
    for cell in ablation.cells:
        if cell.data_missing(environ):
            log(f"skipping {ablation.name}/{cell.name}: its shards folder {cell.data_root(environ)} (with train/ "
                f"and val/) is absent; set {cell.data[0]}=/path/to/shards to run it")
        else:
            cells.append(cell)
    runs = []
    for seed in seeds:
        for cell in cells:
            if per_cell_seeds and seed >= (cell.seeds or ablation.seeds_per_cell):
                continue
            run_dir = Path(runs_dir) / ablation.name / cell.name / f"seed_{seed}"
            paths = [Path(base), cell.path, *([cell.overlay] if cell.overlay else []),
                     *([Path(quick_config)] if quick_config else [])]
            args = [a for p in paths for a in ("--config", str(p))]
            args.append(f"--seed_everything={seed}")
            root = cell.data_root(environ)
            data_args = [f"--data.train_shards={root / 'train'}", f"--data.val_shards={root / 'val'}"] if root else []
            configs = [canonical_config(p) for p in paths]
            ref_args, refs = run_references(configs, runs_dir)  # after the configs, before the user's extras
            args += ref_args + data_args + list(extra) + [f"--run_dir={run_dir}"]
            identity = {"configs": configs, "seed": seed, "args": data_args + list(extra)}
            if refs:  # only then: the identity of every other run stays what its stamp recorded
                identity["reads"] = refs
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
            runs.append(Run(cell, seed, run_dir, args, fingerprint, _samples(identity["configs"], extra)))
    return runs


RUNS_PLACEHOLDER = "{runs}"
STAMP = "DONE"  # a complete run's stamp (grid.store writes it)


def run_references(configs: Sequence[object], runs_dir: Path) -> tuple[list[str], dict[str, str]]:
    """A cell may name another run's folder as ``"{runs}/<ablation>/<cell>/seed_<k>"`` in a string option
    (``model.teacher``): the run gets ``--<section>.<key>=<runs dir>/...`` (the folder the runner trained it
    into, quick runs included), and its identity the fingerprint of that run's stamp when it is complete, so
    a retrained teacher retrains its students. Returns (arguments, {option: stamp fingerprint or ""})."""
    found: dict[str, str] = {}
    for cfg in configs:
        for section, values in (cfg or {}).items() if isinstance(cfg, dict) else ():
            for key, value in (values or {}).items() if isinstance(values, dict) else ():
                if isinstance(value, str) and RUNS_PLACEHOLDER in value:
                    found[f"{section}.{key}"] = value
                elif f"{section}.{key}" in found:
                    del found[f"{section}.{key}"]  # a later layer replaced it
    args, reads = [], {}
    for option, value in found.items():
        path = Path(value.replace(RUNS_PLACEHOLDER, str(runs_dir)))
        args.append(f"--{option}={path}")
        try:
            reads[option] = json.loads((path / STAMP).read_text(encoding="utf-8")).get("fingerprint", "")
        except (OSError, ValueError):
            reads[option] = ""
    return args, reads


def setting(configs: Sequence[object], extra: Sequence[str], key: str) -> int:
    """A positive integer setting (``trainer.max_steps``, ``data.batch_size``) as the parsed configs (later
    ones win) and ``--<key>=`` arguments set it; 0 when unset."""
    section, name = key.split(".")
    found = 0
    for cfg in configs:
        value = ((cfg or {}).get(section) or {}).get(name) if isinstance(cfg, dict) else None
        if isinstance(value, int) and value > 0:
            found = value
    for a in extra:
        k, _, value = a.lstrip("-").partition("=")
        if k == key and value.isdigit():
            found = int(value)
    return found


def _samples(configs: Sequence[object], extra: Sequence[str]) -> int:
    """max_steps x batch_size, 0 when unknown. Only an ordering key for the runner."""
    return setting(configs, extra, "trainer.max_steps") * setting(configs, extra, "data.batch_size")


def longest_first(runs: Sequence[Run]) -> list[Run]:
    """The runs by decreasing `Run.cost`, plan order among equals (stable): with several jobs, a long run
    started last would run alone at the end while the other cores idle."""
    return sorted(runs, key=lambda r: -r.cost)
