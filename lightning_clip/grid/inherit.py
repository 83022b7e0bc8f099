"""`# @from ABLATION/CELL`: a design ablation's cell starts from another ablation's tuned setting.

The fair protocol tunes each family once, in `losses` (grid.tuning). An ablation that asks a question
about one factor (batch size, number of negatives) compares families at their own tuned recipe without a
study per cell: each cell with `# @from losses/<family>` gets that cell's chosen setting from
results/losses_tuning.yaml, written as a config layer after the cell (runs/<ablation>/_from/<cell>-<hash>.yaml,
named by its content: a new choice is a new file, never a rewrite of one a running runner's pending runs
will read), minus every key the cell sets itself, so the cell's own question (its batch size, its k) wins.
The runner resolves these cells after every tune stage of its invocation (grid.cli), so a choice made in
the same `make ablate` is the one they start from.

A missing chosen setting skips the cell with a message, as a missing `# @data` folder does: a fresh clone
without the tuning file still runs the rest. Under --quick the quick tuning file is read when it has the
cell, else the committed one, else the cell runs as written (the quick smoke run checks the mechanism and
the stages after it, not the values).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from lightning_clip.files import atomic_write
from lightning_clip.grid.cells import ABLATIONS_DIR, Ablation, Cell, load_ablation
from lightning_clip.grid.plan import BASE_CONFIG, canonical_config
from lightning_clip.grid.stages import read_tuned, tuned_file
from lightning_clip.grid.tuning import TuneSettings, identity, nested

FOLDER = "_from"


def sets(config: object, key: str) -> bool:
    """Whether a parsed cell config sets the dotted ``key`` (model.loss_args.init_bias)."""
    node = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _chosen(results_dir: Path, source: str, quick: bool) -> tuple[dict, Path]:
    path = tuned_file(results_dir, source)
    chosen = read_tuned(path)
    if quick and Path(results_dir).name == "quick":
        committed = tuned_file(Path(results_dir).parent, source)
        chosen = {**read_tuned(committed), **chosen}
        path = path if path.is_file() else committed
    return chosen, path


def _current_identity(source: str, name: str, *, quick: bool, base: Path, quick_config: Path | None,
                      extra: Sequence[str], ablations_dir: Path) -> str | None:
    """The identity a study of ``source/name`` would have now (grid.tuning.identity); None when that
    ablation or cell is not here (then nothing can be checked)."""
    try:
        src = load_ablation(source, ablations_dir)
    except SystemExit:
        return None
    cell = next((c for c in src.cells if c.name == name), None)
    if cell is None or not src.tune:
        return None
    configs = [Path(base), cell.path, *([Path(quick_config)] if quick_config else [])]
    return identity(src, cell, TuneSettings.of(src, quick=quick), configs, extra)


def resolve(ablation: Ablation, runs_dir: Path, results_dir: Path, *, quick: bool = False, log=print,
            base: Path = BASE_CONFIG, quick_config: Path | None = None, extra: Sequence[str] = (),
            ablations_dir: Path = ABLATIONS_DIR) -> Ablation | None:
    """The ablation with each `# @from` cell's overlay written and set; cells without a chosen setting left
    out (with a message), the whole ablation (None) when that is its baseline. Cells without the directive
    are unchanged."""
    cells: list[Cell] = []
    for cell in ablation.cells:
        if cell.start_from is None:
            cells.append(cell)
            continue
        source, name = cell.start_from
        chosen, path = _chosen(results_dir, source, quick)
        entry = chosen.get(name)
        if entry is None and quick:
            log(f"--quick: {ablation.name}/{cell.name} runs without '# @from {source}/{name}' ({path} has no "
                "chosen setting for it)")
            cells.append(cell)
            continue
        if entry is None:
            log(f"skipping {ablation.name}/{cell.name}: '# @from {source}/{name}' but {path} has no chosen setting "
                f"for {name} (run `make ablate ABLATION={source} STAGES=tune`, or commit its tuning file)")
            continue
        now = _current_identity(source, name, quick=quick, base=base, quick_config=quick_config, extra=extra,
                                ablations_dir=ablations_dir)
        if now is not None and entry.get("identity") != now:
            # still a tuned choice, but for other configs or another budget: say so, do not hide it
            log(f"{ablation.name}/{cell.name}: the chosen setting of {source}/{name} in {path} was tuned for other "
                f"configs or budget (identity {entry.get('identity')}, now {now}); `make ablate ABLATION={source} "
                "STAGES=tune` tunes it again")
        if cell.overlay is not None:
            raise SystemExit(f"{cell.path}: '# @from' and a tuned overlay on one cell: tune it or inherit, not both")
        own = canonical_config(cell.path)
        setting = {k: v for k, v in entry["setting"].items() if not sets(own, k)}
        kept = ", ".join(f"{k}={v}" for k, v in sorted(setting.items())) or "nothing (the cell sets every key)"
        text = (f"# {cell.name}: the chosen setting of {source}/{name} (trial {entry.get('trial')}), "
                f"keys the cell sets itself left out: {kept}\n" + yaml.safe_dump(nested(setting, own), sort_keys=True))
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        overlay = Path(runs_dir) / ablation.name / FOLDER / f"{cell.name}-{digest}.yaml"
        if not overlay.is_file():
            atomic_write(overlay, text)
        cells.append(dataclasses.replace(cell, overlay=overlay))
    if not any(c.baseline for c in cells):
        log(f"skipping ablation '{ablation.name}': its baseline has no chosen setting to start from (see above)")
        return None
    return dataclasses.replace(ablation, cells=tuple(cells))
