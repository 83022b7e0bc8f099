"""The fair protocol's two stages after an ablation's default-recipe runs, for an ablation whose
`_ablation.yaml` declares `tune:` (and `confirm:`):

- **tune**: every cell's Optuna study on the same budget (`grid.tuning`), selected on the validation split;
  the chosen settings go to results/<ablation>_tuning.yaml (committed: a fresh clone confirms without
  re-tuning while the cells, base and budget are unchanged; `--retune` redoes it).
- **confirm**: each cell at its chosen setting, at the full budget, `confirm.seeds` seeds (default 5,
  disjoint from the tuning seed), as the ablation `<ablation>_tuned` (runs/<ablation>_tuned/<cell>/seed_k);
  then the default-recipe and the tuned runs are evaluated on the held-out test split, which no earlier
  stage reads.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from lightning_clip.files import atomic_write
from lightning_clip.grid.cells import Ablation
from lightning_clip.grid.plan import canonical_config
from lightning_clip.grid.progress import Progress
from lightning_clip.grid.runner import Failure, run_jobs
from lightning_clip.grid.tuning import CellStudy, Studies, TuneSettings, identity, nested

CONFIRM_DEFAULTS = {"seeds": 5, "margin": 1.5, "quick": {"seeds": 1}}
TUNED_SUFFIX = "_tuned"
CHOSEN_SUFFIX = "_tuning.yaml"


def tuned_file(results_dir: Path, ablation: str) -> Path:
    return Path(results_dir) / f"{ablation}{CHOSEN_SUFFIX}"


def read_tuned(path: Path) -> dict:
    """{cell: {study, identity, trial, rsum, setting}} from a chosen-settings file; {} when absent."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "setting" in v for v in data.values()):
        raise SystemExit(f"{path}: expected a mapping of cell -> {{setting: ..., trial: ..., rsum: ...}}")
    return data


def confirm_settings(ablation: Ablation, quick: bool = False) -> dict:
    given = dict(ablation.confirm)
    unknown = set(given) - set(CONFIRM_DEFAULTS)
    if unknown:
        raise SystemExit(f"{ablation.name}/_ablation.yaml: confirm: unknown keys {sorted(unknown)} "
                         f"(known: {', '.join(CONFIRM_DEFAULTS)})")
    merged = {**CONFIRM_DEFAULTS, **given, **(dict(given.get("quick") or CONFIRM_DEFAULTS["quick"]) if quick else {})}
    if not isinstance(merged["seeds"], int) or merged["seeds"] < 1:
        raise SystemExit(f"{ablation.name}/_ablation.yaml: confirm.seeds={merged['seeds']!r}: a positive integer")
    return merged


def tune(ablation: Ablation, *, runs_dir: Path, results_dir: Path, base: Path, quick_config: Path | None,
         extra: Sequence[str], prefix: Sequence[str], executor, parallel: int, storage: str | None = None,
         retune: bool = False, log=print) -> list[Failure]:
    """Run (or resume) every cell's study; write the chosen settings and the tuning report."""
    settings = TuneSettings.of(ablation, quick=quick_config is not None)
    chosen_path = tuned_file(results_dir, ablation.name)
    chosen = read_tuned(chosen_path)
    plans = []
    for cell in ablation.cells:
        configs = [Path(base), cell.path, *([Path(quick_config)] if quick_config else [])]
        plans.append((cell, configs, identity(ablation, cell, settings, configs, extra)))
    if not retune and all(chosen.get(c.name, {}).get("identity") == ident for c, _, ident in plans):
        log(f"tune {ablation.name}: every cell's chosen setting in {chosen_path} matches its configs and budget "
            "(--retune to tune again)")
        return []
    studies = [CellStudy(ablation, cell, settings, runs_dir, prefix,
                         [a for p in configs for a in ("--config", str(p))] + list(extra), ident, storage)
               for cell, configs, ident in plans]
    source = Studies(studies)
    log(f"tune {ablation.name}: {len(studies)} cells x {settings.trials} trials (TPE, successive halving from "
        f"step {settings.min_resource}, reduction {settings.reduction_factor}); {len(source)} trial(s) to go")
    failures = run_jobs(source, executor, source, parallel=parallel, progress=Progress(len(source), parallel))
    summaries = [s.summary() for s in studies]
    header = (f"# The tuning stage's chosen setting of each cell of `{ablation.name}` (lightning_clip.grid.tuning):\n"
              "# the best trial that ran its whole budget, by plain validation rsum. The confirm stage reads it.\n")
    for (cell, _, ident), summary, study in zip(plans, summaries, studies):
        if summary["best"] is not None:
            chosen[cell.name] = {"study": study.study.study_name, "identity": ident, "trial": summary["best"]["trial"],
                                 "rsum": round(float(summary["best"]["rsum"]), 3),
                                 "setting": summary["best"]["params"]}
        else:
            log(f"tune {ablation.name}/{cell.name}: no trial ran its whole budget; no chosen setting")
    atomic_write(chosen_path, header + yaml.safe_dump(chosen, sort_keys=True))
    from lightning_clip import report

    report.write_tuning(ablation.name, summaries, results_dir, settings=dataclasses.asdict(
        dataclasses.replace(settings, space=tuple(p.describe() for p in settings.space))))
    return failures


def confirm_ablation(ablation: Ablation, runs_dir: Path, results_dir: Path, log=print) -> Ablation | None:
    """The ablation `<name>_tuned`: each cell with a chosen setting, that setting layered after the cell
    (written to runs/<name>_tuned/_overlays/<cell>.yaml). None when the baseline has no chosen setting."""
    chosen = read_tuned(tuned_file(results_dir, ablation.name))
    name = ablation.name + TUNED_SUFFIX
    cells = []
    for c in ablation.cells:
        entry = chosen.get(c.name)
        if entry is None:
            log(f"confirm {ablation.name}: no chosen setting for {c.name} in {tuned_file(results_dir, ablation.name)}; "
                "it is left out")
            continue
        overlay = Path(runs_dir) / name / "_overlays" / f"{c.name}.yaml"
        atomic_write(overlay, f"# {c.name}: trial {entry.get('trial')} of {entry.get('study')}\n"
                     + yaml.safe_dump(nested(entry["setting"], canonical_config(c.path)), sort_keys=True))
        cells.append(dataclasses.replace(c, ablation=name, overlay=overlay, seeds=None, search=()))
    if not any(c.baseline for c in cells):
        log(f"confirm {ablation.name}: the baseline has no chosen setting; nothing to confirm")
        return None
    return Ablation(name, tuple(cells), report={})  # confirm_settings reads the tuned ablation's own
