"""The tuning stage: each cell of an ablation that declares `tune:` (its `_ablation.yaml`) gets an Optuna
study with the same budget as every other cell: the same number of trials, the same sampler (TPE, seeded)
and pruner (successive halving on the validations a trial logs), the same maximum steps. A trial is a fit
run of the grid's one loop (`runner.run_jobs`), with the sampled setting written as one more config layer.

    runs/<ablation>/_tuning/study.db                  the studies (SQLite: survives kill -9, resumes)
    runs/<ablation>/_tuning/<cell>/trial_<n>/         one trial's run folder (trial.yaml: its setting)
    results/<ablation>_tuning.yaml                    the chosen setting of each cell (the confirm stage
                                                      reads it; committed, so confirming needs no re-tuning)

The objective is plain rsum on the validation split (R@1 + R@5 + R@10, both directions), what image-text
retrieval papers select on. Trials use the tuning seed (`tune.seed`, far from the confirmation seeds
0..n-1), the same for every trial, so that trials differ in their setting only. The runner reads each
validation from the trial's final_metrics.json while it runs, reports it to the study and stops the trial
when the pruner says so; a study resumed after a crash marks the trials its dead runner left running as
failed and asks for new ones (failed trials do not count toward the budget).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from lightning_clip.files import atomic_write
from lightning_clip.grid.cells import Ablation, Cell, Param, parse_param
from lightning_clip.grid.plan import canonical_config, setting
from lightning_clip.grid.store import METRICS, Job

OBJECTIVE_KEYS = tuple(f"val/{d}/R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10))
TUNING_DIR, STUDY_DB, TRIAL_CONFIG = "_tuning", "study.db", "trial.yaml"
FAILURE = "failure"   # a failed trial's user attribute: why (a failed trial is drawn again, not counted)
INTERRUPTED = "interrupted: its runner stopped while it ran"
DEFAULTS = {"trials": 12, "max_steps": None, "seed": 1000, "validate_every": 500, "min_resource": 500,
            "reduction_factor": 3, "space": {}, "quick": {}}


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    trials: int
    max_steps: int | None       # each trial's steps (None: the cell's own budget)
    seed: int
    validate_every: int         # the pruner's rungs are read at these validations
    min_resource: int           # successive halving's first rung, in steps
    reduction_factor: int
    space: tuple[Param, ...]    # shared by every cell (a cell's `# @tune` overrides a key)

    @classmethod
    def of(cls, ablation: Ablation, quick: bool = False) -> "TuneSettings":
        where = f"{ablation.name}/_ablation.yaml: tune"
        given = dict(ablation.tune)
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(DEFAULTS)})")
        merged = {**DEFAULTS, **given, **(dict(given.get("quick") or {}) if quick else {})}
        for key in ("trials", "seed", "validate_every", "min_resource", "reduction_factor"):
            if not isinstance(merged[key], int) or merged[key] < (0 if key == "seed" else 1):
                raise SystemExit(f"{where}.{key}={merged[key]!r}: a positive integer")
        try:
            space = tuple(parse_param([key, *spec], where) for key, spec in (merged["space"] or {}).items())
        except ValueError as e:
            raise SystemExit(str(e)) from None
        return cls(merged["trials"], merged["max_steps"], merged["seed"], merged["validate_every"],
                   merged["min_resource"], merged["reduction_factor"], space)

    def space_of(self, cell: Cell) -> tuple[Param, ...]:
        own = {p.key: p for p in cell.search}
        return tuple(own.pop(p.key, p) for p in self.space) + tuple(own.values())


def objective(metrics: Mapping[str, float]) -> float | None:
    """Plain validation rsum in percent, or None when a recall is missing (no validation yet)."""
    values = [metrics.get(k) for k in OBJECTIVE_KEYS]
    return None if any(v is None for v in values) else 100.0 * sum(values)


def nested(setting: Mapping[str, object], cell_config: Mapping | None) -> dict:
    """A dotted setting as the config layer LightningCLI reads. A dict-valued option (model.loss_args) is
    written whole, the cell's own entries included, so the layer never drops what the cell sets."""
    out: dict = {}
    for key, value in setting.items():
        *parents, leaf = key.split(".")
        node, base = out, cell_config or {}
        for p in parents:
            base = (base.get(p) if isinstance(base, Mapping) else None) or {}
            if p not in node:
                node[p] = dict(base) if isinstance(base, Mapping) and p.endswith("_args") else {}
            node = node[p]
        node[leaf] = value
    return out


def _max_steps(args: Sequence[str]) -> int:
    """trainer.max_steps of a trial's arguments (``--config`` files, then ``--trainer.max_steps=``)."""
    configs = [canonical_config(Path(args[i + 1])) for i, a in enumerate(args[:-1]) if a == "--config"]
    return setting(configs, [a for a in args if a.startswith("--trainer.")], "trainer.max_steps")


def _suggest(trial, p: Param):
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.args))
    if p.kind in ("int", "logint"):
        return trial.suggest_int(p.key, int(p.args[0]), int(p.args[1]), log=p.kind == "logint")
    return trial.suggest_float(p.key, float(p.args[0]), float(p.args[1]), log=p.kind == "log")


class CellStudy:
    """One cell's study and its trials as jobs: a `runner.Source` (asks the study as slots free up) and
    the loop's records (reports validations, prunes, tells the outcome)."""

    def __init__(self, ablation: Ablation, cell: Cell, settings: TuneSettings, runs_dir: Path,
                 prefix: Sequence[str], base_args: Sequence[str], identity: str, storage: str | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.cell, self.settings = optuna, cell, settings
        self.folder = Path(runs_dir) / ablation.name / TUNING_DIR / cell.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.base_args = list(prefix), list(base_args)
        self.cell_config = canonical_config(cell.path)
        self.max_steps = settings.max_steps or _max_steps(base_args)
        self.space = settings.space_of(cell)
        if not self.space:
            raise SystemExit(f"{cell.path}: tuning needs a search space (`tune.space` in _ablation.yaml or "
                             f"'# @tune' lines in the cell)")
        storage = storage or f"sqlite:///{(self.folder.parent / STUDY_DB).resolve()}"
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.min_resource,
                                                        reduction_factor=settings.reduction_factor)
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(1, settings.trials // 2))
        self.study = optuna.create_study(study_name=f"{ablation.name}/{cell.name}/{identity}", storage=storage,
                                         sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True)
        self.trials: dict[int, object] = {}   # this call's live trials (number -> optuna Trial)
        self.settings_of: dict[int, dict] = {}  # number -> its sampled setting, written by prepare()
        self.reported: dict[int, int] = {}    # number -> last step reported
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # its runner died with it

    # -- the budget ------------------------------------------------------------------------------------
    def counted(self) -> int:
        """Trials that count toward the budget: finished (complete or pruned) and this call's running ones."""
        S = self.optuna.trial.TrialState
        return len(self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED))) + len(self.trials)

    def failures(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.FAIL,)))

    def __len__(self) -> int:
        return max(0, self.settings.trials - self.counted())

    # -- runner.Source ---------------------------------------------------------------------------------
    def exhausted(self) -> bool:
        return self.counted() >= self.settings.trials or self.failures() >= 2 * self.settings.trials

    def next(self, active_keys: set[str]) -> Job | None:
        if self.exhausted():
            return None
        trial = self.study.ask()
        setting = {p.key: _suggest(trial, p) for p in self.space}
        self.trials[trial.number], self.settings_of[trial.number] = trial, setting
        folder = self.folder / f"trial_{trial.number:03d}"
        s = self.settings
        args = [*self.base_args, "--config", str(folder / TRIAL_CONFIG), f"--seed_everything={s.seed}",
                *([f"--trainer.max_steps={s.max_steps}"] if s.max_steps else []),
                f"--trainer.val_check_interval={s.validate_every}", f"--run_dir={folder}"]
        job = Job(f"tune {self.cell.ablation}/{self.cell.name} trial {trial.number}", folder,
                  [*self.prefix, *args], "run.log", METRICS, f"trial:{self.study.study_name}:{trial.number}",
                  run=None)
        return job

    # -- the loop's records ----------------------------------------------------------------------------
    @staticmethod
    def _number(job: Job) -> int:
        return int(job.key.rsplit(":", 1)[1])

    def satisfy(self, job: Job) -> str | None:
        return None

    def prepare(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)
        job.folder.mkdir(parents=True)
        text = yaml.safe_dump(nested(self.settings_of[self._number(job)], self.cell_config), sort_keys=True)
        atomic_write(job.folder / TRIAL_CONFIG, f"# trial {self._number(job)} of {self.study.study_name}\n{text}")

    def _report(self, job: Job) -> tuple[int, float] | None:
        """Report a validation the study has not seen yet; its (step, objective) or None."""
        try:
            metrics = json.loads((job.folder / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value, step, n = objective(metrics), metrics.get("step"), self._number(job)
        if value is None or not isinstance(step, int) or step <= self.reported.get(n, -1):
            return None
        self.trials[n].report(value, step)
        self.reported[n] = step
        return step, value

    def check(self, job: Job) -> str | None:
        seen = self._report(job)
        # the last validation is the trial's result, not a rung: a trial that got there is complete
        if seen is not None and seen[0] < self.max_steps and self.trials[self._number(job)].should_prune():
            return f"pruned at step {seen[0]} (validation rsum {seen[1]:.1f})"
        return None

    def stopped(self, job: Job, reason: str, seconds: float) -> None:
        n = self._number(job)
        self.study.tell(self.trials.pop(n), state=self.optuna.trial.TrialState.PRUNED)

    def record(self, job: Job, seconds: float, info: dict) -> None:
        self._report(job)
        n = self._number(job)
        metrics = json.loads((job.folder / METRICS).read_text(encoding="utf-8"))
        value = objective(metrics)
        trial = self.trials.pop(n)
        if value is None:
            trial.set_user_attr(FAILURE, f"no objective in {METRICS}")
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)

    def failed(self, job: Job, reason: str) -> None:
        trial = self.trials.pop(self._number(job))
        trial.set_user_attr(FAILURE, reason[-300:])
        self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)

    # -- what the stage reports --------------------------------------------------------------------------
    def summary(self) -> dict:
        """Every finished trial (setting, steps reached, objective, state) and the chosen one: the best
        trial that ran its whole budget (a pruned trial's value is from fewer steps)."""
        S = self.optuna.trial.TrialState
        rows = []
        for t in self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL)):
            steps = max(t.intermediate_values) if t.intermediate_values else None
            value = t.value if t.state == S.COMPLETE else (t.intermediate_values.get(steps) if steps else None)
            rows.append({"trial": t.number, "state": t.state.name.lower(), "steps": steps, "rsum": value,
                         "params": dict(t.params)})
            if t.state == S.FAIL:  # a live failure says why; one without a reason was left running by a stopped runner
                rows[-1]["failure"] = t.user_attrs.get(FAILURE, INTERRUPTED)
        complete = [r for r in rows if r["state"] == "complete" and r["rsum"] is not None]
        best = max(complete, key=lambda r: r["rsum"]) if complete else None
        importance = {}
        if len(complete) >= 2 and len(self.space) >= 1:
            try:
                importance = self.optuna.importance.get_param_importances(self.study)
            except (RuntimeError, ValueError):  # every trial at one value of a parameter: nothing to rank
                importance = {}
        return {"cell": self.cell.name, "trials": rows, "best": best, "importance": dict(importance),
                "space": [p.describe() for p in self.space]}


def identity(ablation: Ablation, cell: Cell, settings: TuneSettings, configs: Sequence[Path],
             extra: Sequence[str]) -> str:
    """What makes two studies the same: the parsed configs, the budget, the pruner, the space and the extra
    arguments. A change starts a new study (the old one stays in the database)."""
    what = {"configs": [canonical_config(p) for p in configs], "extra": list(extra),
            "settings": dataclasses.asdict(dataclasses.replace(settings, space=())),
            "space": [p.describe() for p in settings.space_of(cell)]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Studies:
    """Several cells' studies as one `runner.Source` and one records object for the loop: cells in order,
    so a cell's sampler sees its finished trials before the next cell starts."""

    def __init__(self, studies: Sequence[CellStudy]):
        self.studies = list(studies)
        self._by_prefix = {f"trial:{s.study.study_name}:": s for s in self.studies}

    def __len__(self) -> int:
        return sum(len(s) for s in self.studies)

    def exhausted(self) -> bool:
        return all(s.exhausted() for s in self.studies)

    def next(self, active_keys: set[str]) -> Job | None:
        for s in self.studies:
            if not s.exhausted():
                return s.next(active_keys)
        return None

    def of(self, job: Job) -> CellStudy:
        return self._by_prefix[job.key.rsplit(":", 1)[0] + ":"]

    def satisfy(self, job: Job) -> str | None:
        return None

    def prepare(self, job: Job) -> None:
        self.of(job).prepare(job)

    def check(self, job: Job) -> str | None:
        return self.of(job).check(job)

    def stopped(self, job: Job, reason: str, seconds: float) -> None:
        self.of(job).stopped(job, reason, seconds)

    def record(self, job: Job, seconds: float, info: dict) -> None:
        self.of(job).record(job, seconds, info)

    def failed(self, job: Job, reason: str) -> None:
        self.of(job).failed(job, reason)
