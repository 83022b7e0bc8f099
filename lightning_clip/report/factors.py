"""The factors an ablation varies, as TensorBoard's HParams tab shows them.

Each cell is a YAML delta over experiments/base.yaml (the manifest lists each cell's file): its keys,
flattened to dotted names (``model.loss``, ``model.loss_args.init_bias``, ``data.batch_size``,
``trainer.max_steps``), united over the ablation's cells, are the factors. A run's value of a factor is the
one its merged ``config.yaml`` holds (what ran: the cell's value, else base.yaml's); a factor the run's
configuration does not set at all (``model.loss_args.init_bias`` of ``infonce``: the loss' own default) is
left out of that run's session, which the tab shows as an empty cell.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

#: the repository root: a manifest's relative config paths are tried from the working directory, then here
REPO = Path(__file__).resolve().parents[2]
#: settings of a run that are not factors (each run has its own folder and seed)
NOT_FACTORS = ("seed_everything", "run_dir", "experiment", "overwrite", "ckpt_path")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested mappings as ``a.b.c`` keys; an empty mapping has no leaf."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _cell_file(config: str, ablation_dir: Path) -> Path | None:
    path = Path(config)
    for candidate in (path, REPO / path, ablation_dir / path):
        if candidate.is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def factor_keys(manifest: Mapping, ablation_dir: str | os.PathLike,
                run_dirs: Iterable[str | os.PathLike] = ()) -> list[str]:
    """The dotted keys the ablation's cells set, in the order first seen (cells in manifest order). A cell
    file that cannot be found (a runs folder moved to another machine) falls back to the keys whose values
    differ between the runs' config.yaml."""
    ablation_dir = Path(ablation_dir)
    keys: dict[str, None] = {}
    missing = False
    for cell in manifest.get("cells", []):
        path = _cell_file(cell["config"], ablation_dir) if cell.get("config") else None
        if path is None:
            missing = True
            continue
        keys.update(dict.fromkeys(flatten(_read_yaml(path) or {})))
    if missing or not keys:
        configs = [run_config(d) for d in run_dirs]
        for key in sorted({k for c in configs for k in c}):
            if len({json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}) > 1:
                keys.setdefault(key)
    return [k for k in keys if k not in NOT_FACTORS]


def tuned_keys(trial_dirs: Iterable[str | os.PathLike]) -> list[str]:
    """The dotted keys the tuning stage sampled (each trial's trial.yaml, a config layer), sorted."""
    keys: set[str] = set()
    for d in trial_dirs:
        path = Path(d) / "trial.yaml"
        if path.is_file():
            keys.update(flatten(_read_yaml(path) or {}))
    return sorted(keys)


def run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's merged configuration (config.yaml), flattened; {} when it has none."""
    path = Path(run_dir) / "config.yaml"
    return flatten(_read_yaml(path) or {}) if path.is_file() else {}


def hparam_value(value: Any) -> Any:
    """A value TensorBoard's hparams accept: bool, number or string (lists and the like as JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _text(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def session_values(keys: Sequence[str], configs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{run: {key: value}} with one type per key across runs: all bool stay bool, all numbers become float,
    anything mixed (``init_bias`` `prior` in one cell and -10 in another) becomes a string everywhere
    (floats to 6 significant digits)."""
    out: dict[str, dict[str, Any]] = {run: {} for run in configs}
    for key in keys:
        present = {run: hparam_value(c[key]) for run, c in configs.items() if key in c and c[key] is not None}
        values = list(present.values())
        if values and all(isinstance(v, bool) for v in values):
            cast = bool
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            cast = float
        else:
            cast = _text
        for run, v in present.items():
            out[run][key] = cast(v)
    return out
