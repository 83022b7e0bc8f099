"""The one owner of "what is finished" in a runs folder: stamps, run states, equal-run copies, evaluations,
the manifest and the runner's lock.

A training run is complete when its folder holds a `DONE` stamp, written only after its command exited 0
and left final_metrics.json. The stamp records the run's fingerprint, so a complete run whose configs
changed since is "stale" and redone; a folder without a stamp (Ctrl-C, kill -9, a failure) is "partial",
cleared and redone; a run whose fingerprint equals a complete run elsewhere is copied from it. An
evaluation is complete when the run folder holds eval.json; a copied run shares its original's.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Sequence

from lightning_clip.files import atomic_write
from lightning_clip.grid.cells import Ablation
from lightning_clip.grid.plan import STAMP, Run

LOG, PID_FILE, METRICS, MANIFEST = "run.log", "PID", "final_metrics.json", "ablation.json"
EVAL_FILE, EVAL_LOG = "eval.json", "eval.log"


def eval_files(split: str = "val") -> tuple[str, str]:
    """The evaluation's output and log in a run folder: eval.json for the validation split,
    eval_<split>.json for another (what `python -m lightning_clip eval --split` writes)."""
    return (EVAL_FILE, EVAL_LOG) if split == "val" else (f"eval_{split}.json", f"eval_{split}.log")
JOB_FILE = "JOB"  # the SLURM job id of a run, beside its run.log
LOCK_FILE = ".ablate.lock"


@dataclasses.dataclass
class Job:
    """One process for the runner's loop: a training run or the evaluation of one."""
    label: str
    folder: Path
    command: list[str]
    log_name: str            # the process's stdout and stderr, in ``folder``
    output: str              # the file a successful job leaves in ``folder``
    key: str                 # jobs with equal keys never run at once (the later one is copied instead)
    run: Run | None          # the run it trains or evaluates (None: a tuning trial, whose study owns it)
    cost: int = 0            # the loop starts costly jobs first

    @property
    def log_path(self) -> Path:
        return self.folder / self.log_name


def read_stamp(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def state(run: Run) -> str:
    """'done', 'stale' (complete, but its configs changed), 'partial' (a folder without stamp) or 'new'."""
    if not run.run_dir.exists():
        return "new"
    stamp = read_stamp(run.run_dir)
    if stamp is None:
        return "partial"
    return "done" if stamp.get("fingerprint") == run.fingerprint else "stale"


def _kill_orphan(run_dir: Path) -> None:
    """A runner killed with -9 leaves its child running in its own session where no parent-death signal
    exists: stop it before its folder is cleared, or it would keep writing into the redone run. Only the
    process recorded in PID, and only if its command line still names this run folder (ids are reused)."""
    try:
        pid = int((run_dir / PID_FILE).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if f"--run_dir={run_dir}" in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
        except OSError:
            pass


def clear(run_dir: Path) -> None:
    if run_dir.exists():
        _kill_orphan(run_dir)
        shutil.rmtree(run_dir)


def tail(path: Path, n: int = 5) -> str:
    """The last ``n`` lines of a log, indented for a failure message."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in lines[-n:])


@dataclasses.dataclass
class Selection:
    pending: list[Run]
    complete: int
    redo: list[tuple[Run, str]]   # (run, why) for each partial or stale run


def select(runs: Sequence[Run]) -> Selection:
    """The runs still to do, how many are complete, and why each redone run is redone."""
    pending, redo, complete = [], [], 0
    for run in runs:
        st = state(run)
        if st == "done":
            complete += 1
            continue
        if st in ("partial", "stale"):
            redo.append((run, "interrupted or failed before" if st == "partial" else "its configs changed since it ran"))
        pending.append(run)
    return Selection(pending, complete, redo)


class TrainingRuns:
    """How the loop treats a training job: copy an equal complete run instead of training, start in a
    clean folder, stamp on success."""

    def __init__(self, runs_dir: Path | None):
        self.index: dict[str, Path] = {}  # fingerprint -> a complete run folder
        if runs_dir is not None:
            for stamp_path in sorted(Path(runs_dir).glob(f"*/*/seed_*/{STAMP}")):
                stamp = read_stamp(stamp_path.parent)
                if stamp and "fingerprint" in stamp and (stamp_path.parent / METRICS).exists():
                    self.index.setdefault(stamp["fingerprint"], stamp_path.parent)

    def satisfy(self, job: Job) -> str | None:
        """Copy an equal complete run into the job's folder; the event line, or None to train."""
        run, source = job.run, self.index.get(job.run.fingerprint)
        if source is None or source == run.run_dir:
            return None
        clear(run.run_dir)
        # checkpoints stay with the original: the tables and curves need metrics and events only
        shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns(STAMP, PID_FILE, JOB_FILE, "*.ckpt"))
        self._stamp(run, job.command, 0.0, copied_from=str(source))
        return f"copied {run.label} from {source} (same configs and seed)"

    def prepare(self, job: Job) -> None:
        clear(job.folder)
        job.folder.mkdir(parents=True)

    def record(self, job: Job, seconds: float, info: dict) -> None:
        self._stamp(job.run, job.command, seconds, **info)
        self.index.setdefault(job.run.fingerprint, job.run.run_dir)

    @staticmethod
    def _stamp(run: Run, command: list[str], seconds: float, **extra) -> None:
        stamp = dict(fingerprint=run.fingerprint, command=command, wall_time_s=round(seconds, 2),
                     finished=_dt.datetime.now().isoformat(timespec="seconds"), **extra)
        atomic_write(run.run_dir / STAMP, json.dumps(stamp, indent=1) + "\n")


class Evaluations:
    """How the loop treats an evaluation job: it adds eval.json to a complete run's folder; nothing to
    copy, clear or stamp (eval.json itself says it is done)."""

    def satisfy(self, job: Job) -> str | None:
        return None

    def prepare(self, job: Job) -> None:
        pass

    def record(self, job: Job, seconds: float, info: dict) -> None:
        pass


def evaluations_to_do(runs: Sequence[Run], split: str = "val") -> tuple[list[Run], list[tuple[Run, Path]]]:
    """The complete runs without the split's eval file to evaluate (a copied run's original instead of
    the copy, once), and the (copy, original) pairs whose file is shared after."""
    out = eval_files(split)[0]
    todo: list[Run] = []
    copies: list[tuple[Run, Path]] = []
    for r in runs:
        if state(r) != "done" or (r.run_dir / out).exists():
            continue
        source = (read_stamp(r.run_dir) or {}).get("copied_from")
        if source:
            copies.append((r, Path(source)))
            if not (Path(source) / out).exists() and all(t.run_dir != Path(source) for t in todo):
                todo.append(dataclasses.replace(r, run_dir=Path(source)))
        elif all(t.run_dir != r.run_dir for t in todo):
            todo.append(r)
    return todo, copies


def share_evaluations(copies: Sequence[tuple[Run, Path]], split: str = "val") -> None:
    out = eval_files(split)[0]
    for run, source in copies:
        if (source / out).exists():
            shutil.copy2(source / out, run.run_dir / out)


def write_manifest(ablation: Ablation, runs_dir: Path, seeds: Sequence[int], test_margin: float | None = None) -> None:
    """runs/<ablation>/ablation.json: cells, baseline, descriptions and the ablation's report settings, so
    that the report (and the notebook) can be rebuilt from the runs folder alone. ``test_margin``: the
    ablation is reported on the test split with this equivalence margin (`test_split` in the manifest), so
    the report names its validation table `<ablation>_val` and does not overwrite the test-split table."""
    folder = Path(runs_dir) / ablation.name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = dict(ablation=ablation.name, baseline=ablation.baseline.name, seeds=list(seeds),
                    cells=[dict(name=c.name, description=c.description, config=str(c.path)) for c in ablation.cells],
                    report=dict(ablation.report))
    if test_margin is not None:
        manifest["test_split"] = dict(margin=test_margin)
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


class Lock:
    """One runner per runs folder: two would clear each other's unstamped runs."""

    def __init__(self, runs_dir: Path):
        self.path = Path(runs_dir) / LOCK_FILE

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            # A POSIX record lock (lockf), not flock: it belongs to this process alone. An flock is shared
            # with every child forked while it is held, so after a kill -9 of the runner its runs, still
            # stopping on their parent-death SIGTERM, would keep the folder locked against the resume.
            fcntl.lockf(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise SystemExit(f"another `python -m lightning_clip.ablate` is running on {self.path.parent} "
                             f"(lock {self.path}); wait for it to finish or stop it") from None
        return self

    def __exit__(self, *exc):
        self.f.close()
