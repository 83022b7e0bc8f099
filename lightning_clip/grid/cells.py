"""An ablation folder read into typed objects: its cells (with their header directives) and its settings.

    experiments/ablations/<ablation>/<cell>.yaml     a short delta over experiments/base.yaml
    experiments/ablations/<ablation>/_ablation.yaml  optional: settings of the ablation as a whole

Directives are comment lines at the top of a cell. The first comment line says what the cell tests (it
becomes the cell's description in the tables); lines starting with `# @` are directives:

    # @baseline          the cell the others are compared with (exactly one per ablation)
    # @quick             the cell belongs to the --quick subset
    # @data VAR DEFAULT  the cell reads shards from $VAR (default DEFAULT), a folder with train/ and val/;
                         the runner passes --data.train_shards/--data.val_shards, and skips the cell with
                         a message when the folder is absent (real data is not on every machine)
    # @seeds N           this cell's number of seeds (0..N-1) instead of 3 (5 on the test protocol). `--seeds` on the command line
                         overrides every cell; `--quick` uses 1.
    # @tune KEY KIND ARGS  one dimension of the cell's search space for the tuning stage (grid.tuning):
                         KIND log|float LOW HIGH, int|logint LOW HIGH, or choice V1 V2 ...; KEY a config
                         key (model.lr, model.loss_args.init_bias); overrides `_ablation.yaml`'s tune.space
    # @from ABLATION/CELL  start from that cell's tuned setting (results/<ABLATION>_tuning.yaml, the tuning
                         stage's choice), except the keys this cell sets itself: a design ablation compares
                         each family at its own tuned recipe without tuning every cell again (grid.inherit)

`_ablation.yaml` keys (all optional):

    study: true          run only when named (`--ablation NAME`), never by a plain `make ablate`
    requires: [NAME]     ablations whose runs this one reads (a frozen teacher's checkpoint): they join the
                         plan whenever this one runs, and their runs train first
    report:              what the report draws for this ablation (the runner writes it into the manifest)
      curve_tags: [...]  the curves plotted against step (default: the report's own)
      plateau: true      a table of each cell's distance from its own plateau
      budget_against: losses   compare the final values with that ablation's runs (the default budget)
    tune:                the tuning stage (grid.tuning): trials per cell, budget, pruner, shared space
    confirm:             with tune: the confirm stage (seeds at the tuned settings, evaluated on the test
                         split), and the default-recipe grid runs as many, so the two columns pair seed for
                         seed; without tune: the grid itself runs `confirm.seeds` seeds (default 5), is
                         evaluated on the test split too and reported there (results/<ablation>.md; the
                         validation-split table is results/<ablation>_val.md)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import yaml

ABLATIONS_DIR = Path("experiments/ablations")
SETTINGS_FILE = "_ablation.yaml"
# The order `make ablate` runs them in: the main table first, and `losses` before `variance`, which
# repeats three of its cells and so copies their runs. Unlisted ablations follow alphabetically.
PREFERRED_ORDER = ("losses", "batch_size", "batch_steps", "batch_pairs", "batch_steps_b128", "gcl_scale", "gcl_rho",
                   "batch16", "duplicates", "variance", "real")
DEFAULT_SEEDS, QUICK_SEEDS = 3, 1
CONFIRM_SEEDS = 5  # a claim rests on 5 seeds or more (the confirm stage's default too)
DIRECTIVES = ("baseline", "quick", "data", "seeds", "tune", "from")
SETTINGS = {"study": bool, "report": dict, "tune": dict, "confirm": dict, "requires": list}
PARAM_KINDS = ("log", "float", "int", "logint", "choice")


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension of a search space: a config key, how it is sampled, and its range or choices."""
    key: str
    kind: str
    args: tuple

    def describe(self) -> str:
        return f"{self.key} {self.kind} {' '.join(str(a) for a in self.args)}"


def _scalar(word):
    """A directive's word as a number where it reads as one (YAML alone reads `1e-4` as a string)."""
    if not isinstance(word, str):
        return word
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    return yaml.safe_load(word)


def parse_param(words: list, where: str) -> Param:
    """``KEY KIND ARGS...`` (a `# @tune` directive or a `tune.space` entry) as a `Param`; ``where`` names
    the file for the error."""
    if len(words) < 3:
        raise ValueError(f"{where}: a search dimension is 'KEY KIND ARGS...', e.g. 'model.lr log 1e-4 1e-2'; "
                         f"got {' '.join(map(str, words))!r}")
    key, kind, *args = words
    if kind not in PARAM_KINDS:
        raise ValueError(f"{where}: {key}: unknown kind '{kind}' (known: {', '.join(PARAM_KINDS)})")
    if not str(key).startswith(("model.", "data.", "trainer.")):
        raise ValueError(f"{where}: {key}: a search key is a config key under model., data. or trainer.")
    values = tuple(_scalar(a) for a in args)
    if kind == "choice":
        if len(values) < 2:
            raise ValueError(f"{where}: {key}: 'choice' needs at least two values, got {list(values)}")
        return Param(key, kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: {key}: '{kind}' takes LOW HIGH numbers, got {list(values)}")
    low, high = values
    if not low < high or (kind in ("log", "logint") and low <= 0):
        raise ValueError(f"{where}: {key}: needs LOW < HIGH{' and LOW > 0 on a log scale' if 'log' in kind else ''}, "
                         f"got {low} {high}")
    if kind in ("int", "logint") and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"{where}: {key}: '{kind}' takes integer bounds, got {low} {high}")
    return Param(key, kind, (low, high))
REPORT_SETTINGS = {"curve_tags": list, "plateau": bool, "budget_against": str, "pairs": list}


@dataclasses.dataclass(frozen=True)
class Cell:
    ablation: str
    name: str
    path: Path
    description: str
    baseline: bool = False
    quick: bool = False
    data: tuple[str, str] | None = None  # (environment variable, default folder)
    seeds: int | None = None  # `# @seeds N`: the cell's seed count
    search: tuple[Param, ...] = ()  # `# @tune` directives
    overlay: Path | None = None  # a config layered after the cell's own (the confirm stage's tuned setting)
    start_from: tuple[str, str] | None = None  # `# @from ABLATION/CELL`

    def data_root(self, environ: Mapping[str, str] = os.environ) -> Path | None:
        if self.data is None:
            return None
        var, default = self.data
        return Path(environ.get(var) or default)

    def data_missing(self, environ: Mapping[str, str] = os.environ) -> bool:
        root = self.data_root(environ)
        return root is not None and not (root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir())


@dataclasses.dataclass(frozen=True)
class Ablation:
    name: str
    cells: tuple[Cell, ...]
    study: bool = False
    report: Mapping[str, object] = dataclasses.field(default_factory=dict)
    tune: Mapping[str, object] = dataclasses.field(default_factory=dict)
    confirm: Mapping[str, object] = dataclasses.field(default_factory=dict)
    requires: tuple[str, ...] = ()

    @property
    def baseline(self) -> Cell:
        return next(c for c in self.cells if c.baseline)

    @property
    def on_test_split(self) -> bool:
        """A design ablation on the fair protocol: `confirm:` without `tune:` (its grid is its confirmation)."""
        return bool(self.confirm) and not self.tune

    @property
    def seeds_per_cell(self) -> int:
        """A cell's seeds unless it says `# @seeds N`: `confirm.seeds` when the ablation declares `confirm:`
        (tuned or not), else DEFAULT_SEEDS."""
        if self.confirm:
            n = self.confirm.get("seeds", CONFIRM_SEEDS)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise SystemExit(f"{self.name}/{SETTINGS_FILE}: confirm.seeds={n!r}: a positive integer")
            return n
        return DEFAULT_SEEDS

    @property
    def default_seeds(self) -> int:
        """The most seeds any cell runs (each cell's `# @seeds N`, else `seeds_per_cell`)."""
        return max(c.seeds or self.seeds_per_cell for c in self.cells)

    def quick_subset(self) -> "Ablation":
        """The '# @quick' cells plus the baseline (so that the paired differences exist in a smoke run)."""
        return dataclasses.replace(self, cells=tuple(c for c in self.cells if c.quick or c.baseline))


def seeds_for(ablation: Ablation, cli_seeds: int | None = None, quick: bool = False) -> list[int]:
    """The seeds of one ablation: `--seeds` if given, else 1 with --quick, else as many as its cell with
    the most (`# @seeds N`, else DEFAULT_SEEDS); the plan gives each cell only its own."""
    if cli_seeds is not None:
        n = cli_seeds
    elif quick:
        n = QUICK_SEEDS
    else:
        n = ablation.default_seeds
    return list(range(n))


def parse_cell(path: Path, ablation: str) -> Cell:
    """Read a cell's description and directives from its leading comment lines."""
    path = Path(path)
    description, flags, data, seeds, search, start_from = "", set(), None, None, [], None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("#"):
            break  # directives live in the header only
        body = line.lstrip("#").strip()
        if body.startswith("@"):
            word, *args = body[1:].split()
            if word not in DIRECTIVES:
                raise ValueError(f"{path}: unknown directive '# @{word}' (known: {', '.join(DIRECTIVES)})")
            if word == "data":
                if len(args) != 2:
                    raise ValueError(f"{path}: '# @data' takes a variable and a default folder, "
                                     f"e.g. '# @data REAL_SHARDS ../shared/data/flickr8k-96'; got {args}")
                data = (args[0], args[1])
            elif word == "seeds":
                if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
                    raise ValueError(f"{path}: '# @seeds' takes one positive integer, e.g. '# @seeds 1'; got {args}")
                seeds = int(args[0])
            elif word == "tune":
                search.append(parse_param(args, f"{path}: '# @tune'"))
            elif word == "from":
                source, _, cell = (args[0] if len(args) == 1 else "").partition("/")
                if not source or not cell or "/" in cell:
                    raise ValueError(f"{path}: '# @from' takes one ABLATION/CELL, e.g. '# @from losses/infonce'; "
                                     f"got {args}")
                start_from = (source, cell)
            else:
                flags.add(word)
        elif not description:
            description = body
    if not description:
        raise ValueError(f"{path}: a cell starts with a one-line comment saying what it tests")
    return Cell(ablation, path.stem, path, description, "baseline" in flags, "quick" in flags, data, seeds,
                tuple(search), start_from=start_from)


def _check_types(path: Path, given: Mapping, schema: Mapping[str, type], where: str = "") -> None:
    for key, value in given.items():
        if key not in schema:
            raise ValueError(f"{path}: unknown key '{where}{key}' (known: {', '.join(schema)})")
        if value is not None and not isinstance(value, schema[key]):
            raise ValueError(f"{path}: '{where}{key}' must be a {schema[key].__name__}, got {value!r}")


def parse_settings(path: Path) -> dict:
    """`_ablation.yaml`, checked against `SETTINGS` / `REPORT_SETTINGS`; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(given).__name__}")
    _check_types(path, given, SETTINGS)
    _check_types(path, given.get("report") or {}, REPORT_SETTINGS, "report.")
    return given


def load_ablation(name: str, ablations_dir: Path = ABLATIONS_DIR) -> Ablation:
    folder = Path(ablations_dir) / name
    if not folder.is_dir():
        raise SystemExit(f"unknown ablation '{name}': no folder {folder} "
                         f"(available: {', '.join(available(ablations_dir)) or 'none'})")
    try:
        cells = [parse_cell(p, name) for p in sorted(folder.glob("*.yaml")) if not p.name.startswith("_")]
        settings = parse_settings(folder / SETTINGS_FILE)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not cells:
        raise SystemExit(f"ablation '{name}' has no cells ({folder}/*.yaml)")
    baselines = [c.name for c in cells if c.baseline]
    if len(baselines) != 1:
        raise SystemExit(f"ablation '{name}' needs exactly one cell marked '# @baseline', found "
                         f"{baselines or 'none'} in {folder}")
    # baseline first: tables and plots read top-down from the reference
    cells.sort(key=lambda c: not c.baseline)
    # a pair naming no cell would only fail at the report, after the whole grid has trained
    names = {c.name for c in cells}
    pairs = (settings.get("report") or {}).get("pairs") or []
    if not all(isinstance(q, list) and len(q) == 2 and q[0] != q[1] and set(q) <= names for q in pairs):
        raise SystemExit(f"{folder / SETTINGS_FILE}: 'report.pairs' lists [cell, other cell] of this ablation "
                         f"(cells: {sorted(names)}), got {pairs}")
    requires = tuple(settings.get("requires") or ())
    if not all(isinstance(r, str) and r for r in requires) or name in requires:
        raise SystemExit(f"{folder / SETTINGS_FILE}: 'requires' lists other ablations' names, got {list(requires)}")
    return Ablation(name, tuple(cells), bool(settings.get("study")), dict(settings.get("report") or {}),
                    dict(settings.get("tune") or {}), dict(settings.get("confirm") or {}), requires)


def with_requirements(ablations: list[Ablation], ablations_dir: Path = ABLATIONS_DIR) -> list[Ablation]:
    """The ablations plus every ablation they require (transitively), each required one before the first
    that needs it."""
    out: list[Ablation] = []

    def add(a: Ablation, chain: tuple[str, ...]) -> None:
        if a.name in chain:
            raise SystemExit(f"ablations require each other in a circle: {' -> '.join(chain + (a.name,))}")
        for r in a.requires:
            if all(b.name != r for b in out):
                add(load_ablation(r, ablations_dir), chain + (a.name,))
        if all(b.name != a.name for b in out):
            out.append(a)

    for a in ablations:
        add(a, ())
    return out


def required_names(ablations: list[Ablation]) -> set[str]:
    return {r for a in ablations for r in a.requires}


def available(ablations_dir: Path = ABLATIONS_DIR) -> list[str]:
    names = sorted(p.name for p in Path(ablations_dir).glob("*")
                   if p.is_dir() and any(not q.name.startswith("_") for q in p.glob("*.yaml")))
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))
