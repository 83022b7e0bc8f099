"""`python -m lightning_clip.ablate`: run the ablation grid (cells x seeds) resumably, then write the tables.

Layout::

    experiments/ablations/<ablation>/<cell>.yaml   a short delta over experiments/base.yaml
    runs/<ablation>/<cell>/seed_<k>/               one run: TensorBoard events, config.yaml,
                                                   final_metrics.json, run.log, DONE
    results/<ablation>.{md,csv}, results/<ablation>_{curves,bars}.png      (lightning_clip.report)

`--quick` adds experiments/quick.yaml to every run, keeps only the cells marked `# @quick` and one seed,
and writes to runs/quick/ and results/quick/, so a smoke run never mixes with a full run's stamps.

Directives: comment lines at the top of a cell. The first comment line says what the cell tests (it
becomes the cell's description in the tables); lines starting with `# @` are directives:

    # @baseline          the cell the others are compared with (exactly one per ablation)
    # @quick             the cell belongs to the --quick subset
    # @data VAR DEFAULT  the cell reads shards from $VAR (default DEFAULT), a folder with train/ and val/;
                         the runner passes --data.train_shards/--data.val_shards, and skips the cell with
                         a message when the folder is absent (real data is not on every machine)
    # @seeds N           this cell's number of seeds (0..N-1) instead of 3 (the convergence study runs
                         every family once and the baseline three times). `--seeds` on the command line
                         overrides every cell; `--quick` uses 1.

Resumability: a run is complete when its folder holds a `DONE` stamp, written only after the command
exited 0 and left final_metrics.json. A second call skips complete runs; a folder without a stamp
(Ctrl-C, kill -9, a failure) is cleared and redone. The stamp records a fingerprint of the parsed
configs and arguments, so a complete run whose configs changed since is redone too ("stale"), and a
run whose fingerprint equals a complete run of another cell (the `variance` ablation repeats cells of
`losses`) is copied instead of recomputed.

Order: the local runner starts the runs with the most training samples (max_steps x batch size) first,
plan order among equals, so that no long run is left to finish alone on one core; a run equal to an
active one waits for it and is then copied.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence, TextIO

import yaml

from lightning_clip import launch
from lightning_clip.report import atomic_write

ABLATIONS_DIR = Path("experiments/ablations")
BASE_CONFIG = Path("experiments/base.yaml")
QUICK_CONFIG = Path("experiments/quick.yaml")
# The order `make ablate` runs them in: the main table first, and `losses` before `variance`, which
# repeats three of its cells and so copies their runs. Unlisted ablations follow alphabetically.
PREFERRED_ORDER = ("losses", "batch_size", "batch_steps", "duplicates", "variance", "real")
# Studies run only when named (`--ablation convergence`, `make convergence`): the convergence study sets
# the budget that every ablation uses, so it is not part of the grid it budgets (and costs ~20 min).
STUDIES = ("convergence",)
DEFAULT_SEEDS, QUICK_SEEDS = 3, 1
CMD_ENV = "LIGHTNING_CLIP_ABLATE_CMD"  # replaces `python -m lightning_clip fit` (tests use a fake)
STAMP, LOG, PID_FILE, METRICS, MANIFEST = "DONE", "run.log", "PID", "final_metrics.json", "ablation.json"
DIRECTIVES = ("baseline", "quick", "data", "seeds")


# ----------------------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class Cell:
    ablation: str
    name: str
    path: Path
    description: str
    baseline: bool = False
    quick: bool = False
    data: tuple[str, str] | None = None  # (environment variable, default folder)
    seeds: int | None = None  # `# @seeds N`: the ablation's default seed count

    def data_root(self, environ=os.environ) -> Path | None:
        if self.data is None:
            return None
        var, default = self.data
        return Path(environ.get(var) or default)


@dataclasses.dataclass(frozen=True)
class Ablation:
    name: str
    cells: tuple[Cell, ...]

    @property
    def baseline(self) -> Cell:
        return next(c for c in self.cells if c.baseline)

    @property
    def default_seeds(self) -> int:
        """The most seeds any cell runs (each cell's `# @seeds N`, else DEFAULT_SEEDS)."""
        return max(c.seeds or DEFAULT_SEEDS for c in self.cells)


def seeds_for(ablation: Ablation, cli_seeds: int | None = None, quick: bool = False) -> list[int]:
    """The seeds of one ablation: `--seeds` if given, else 1 with --quick, else as many as its cell with
    the most (`# @seeds N`, else DEFAULT_SEEDS); `plan_runs` gives each cell only its own."""
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
    description, flags, data, seeds = "", set(), None, None
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
            else:
                flags.add(word)
        elif not description:
            description = body
    if not description:
        raise ValueError(f"{path}: a cell starts with a one-line comment saying what it tests")
    return Cell(ablation, path.stem, path, description, "baseline" in flags, "quick" in flags, data, seeds)


def load_ablation(name: str, ablations_dir: Path = ABLATIONS_DIR) -> Ablation:
    folder = Path(ablations_dir) / name
    if not folder.is_dir():
        raise SystemExit(f"unknown ablation '{name}': no folder {folder} "
                         f"(available: {', '.join(available(ablations_dir)) or 'none'})")
    cells = [parse_cell(p, name) for p in sorted(folder.glob("*.yaml"))]
    if not cells:
        raise SystemExit(f"ablation '{name}' has no cells ({folder}/*.yaml)")
    baselines = [c.name for c in cells if c.baseline]
    if len(baselines) != 1:
        raise SystemExit(f"ablation '{name}' needs exactly one cell marked '# @baseline', found "
                         f"{baselines or 'none'} in {folder}")
    # baseline first: tables and plots read top-down from the reference
    cells.sort(key=lambda c: not c.baseline)
    return Ablation(name, tuple(cells))


def available(ablations_dir: Path = ABLATIONS_DIR) -> list[str]:
    names = sorted(p.name for p in Path(ablations_dir).glob("*") if p.is_dir() and any(p.glob("*.yaml")))
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


# ------------------------------------------------------------------------------------------- a run
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


def _canonical_config(path: Path) -> object:
    # parsed, so that editing a comment does not invalidate finished runs
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML: {e}") from None


def plan_runs(ablation: Ablation, seeds: Sequence[int], runs_dir: Path, *, base: Path = BASE_CONFIG,
              quick_config: Path | None = None, extra: Sequence[str] = (), environ=os.environ,
              log=print, per_cell_seeds: bool = False) -> list[Run]:
    """The runs of one ablation, seed-major (all cells of seed 0 first: an early table covers every cell).

    With ``per_cell_seeds`` a cell runs only the seeds below its own `# @seeds N` (else DEFAULT_SEEDS);
    without, every cell runs every seed given (`--seeds`, `--quick`)."""
    runs = []
    cells = list(ablation.cells)
    for cell in list(cells):
        root = cell.data_root(environ)
        if root is not None and not (root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir()):
            log(f"skipping {ablation.name}/{cell.name}: its shards folder {root} (with train/ and val/) is "
                f"absent; set {cell.data[0]}=/path/to/shards to run it")
            cells.remove(cell)
    for seed in seeds:
        for cell in cells:
            if per_cell_seeds and seed >= (cell.seeds or DEFAULT_SEEDS):
                continue
            run_dir = Path(runs_dir) / ablation.name / cell.name / f"seed_{seed}"
            paths = [Path(base), cell.path, *([Path(quick_config)] if quick_config else [])]
            args = [a for p in paths for a in ("--config", str(p))]
            args.append(f"--seed_everything={seed}")
            root = cell.data_root(environ)
            data_args = [f"--data.train_shards={root / 'train'}", f"--data.val_shards={root / 'val'}"] if root else []
            args += data_args + list(extra) + [f"--run_dir={run_dir}"]
            # the run folder is not part of the identity of a run: equal configs elsewhere can be copied
            identity = {"configs": [_canonical_config(p) for p in paths], "seed": seed,
                        "args": data_args + list(extra)}
            fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
            runs.append(Run(cell, seed, run_dir, args, fingerprint, _samples(identity["configs"], extra)))
    return runs


def _samples(configs: Sequence[object], extra: Sequence[str]) -> int:
    """max_steps x batch_size as the configs (later ones win) and ``--trainer.max_steps=`` /
    ``--data.batch_size=`` arguments set them; 0 when unknown. Only an ordering key for the runner."""
    found = {"trainer.max_steps": 0, "data.batch_size": 0}
    for cfg in configs:
        for key in found:
            section, name = key.split(".")
            value = ((cfg or {}).get(section) or {}).get(name) if isinstance(cfg, dict) else None
            if isinstance(value, int) and value > 0:
                found[key] = value
    for a in extra:
        key, _, value = a.lstrip("-").partition("=")
        if key in found and value.isdigit():
            found[key] = int(value)
    return found["trainer.max_steps"] * found["data.batch_size"]


def longest_first(runs: Sequence[Run]) -> list[Run]:
    """The runs by decreasing `Run.cost`, plan order among equals (stable): with several jobs, a long run
    started last would run alone at the end while the other cores idle (the previous grid's last 1.5 min)."""
    return sorted(runs, key=lambda r: -r.cost)


def _take_next(pending: list[Run], active_fingerprints: set[str]) -> Run | None:
    """Remove and return the first pending run that no active run equals (an equal run waits, to be
    copied when that one finishes, instead of training the same thing twice at once)."""
    for i, run in enumerate(pending):
        if run.fingerprint not in active_fingerprints:
            return pending.pop(i)
    return None


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


def _write_stamp(run: Run, command: list[str], seconds: float, **extra) -> None:
    stamp = dict(fingerprint=run.fingerprint, command=command, wall_time_s=round(seconds, 2),
                 finished=_dt.datetime.now().isoformat(timespec="seconds"), **extra)
    atomic_write(run.run_dir / STAMP, json.dumps(stamp, indent=1) + "\n")


def _kill_orphan(run_dir: Path) -> None:
    """A runner killed with -9 leaves its child running in its own session: stop it before its folder
    is cleared, or it would keep writing into the redone run. Only the process recorded in PID, and only
    if its command line still names this run folder (process ids are reused)."""
    try:
        pid = int((run_dir / PID_FILE).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if f"--run_dir={run_dir}" in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)  # the child leads its own process group (start_new_session)
        except OSError:
            pass


def clear(run_dir: Path) -> None:
    if run_dir.exists():
        _kill_orphan(run_dir)
        shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------- progress
def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Event lines (started, finished, failed) plus, on a terminal, a status line rewritten in place:
    what runs, how many are done and left, elapsed, and an ETA from the mean duration of this call's runs."""

    def __init__(self, total: int, jobs: int = 1, stream: TextIO | None = None):
        self.total, self.jobs = total, max(1, jobs)
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.monotonic()
        self.finished: list[float] = []
        self.ok = self.failed = self.copied = 0
        self._status = ""

    def eta(self, active_elapsed: Iterable[float] = ()) -> float | None:
        if not self.finished:
            return None
        mean = sum(self.finished) / len(self.finished)
        left_work = (self.total - len(self.finished)) * mean - sum(min(e, mean) for e in active_elapsed)
        return max(0.0, left_work) / self.jobs

    def summary(self, active: dict | None = None) -> str:
        now = time.monotonic()
        elapsed = [now - t for t in (active or {}).values()]
        running = ", ".join(f"{label} ({_hms(now - t)})" for label, t in (active or {}).items())
        done = len(self.finished)
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"[{done}/{self.total} done{failed}, {self.total - done} left | elapsed {_hms(now - self.start)}"
                f" | ETA {_hms(self.eta(elapsed))}]" + (f" running {running}" if running else ""))

    def event(self, msg: str) -> None:
        if self.tty and self._status:
            self.stream.write("\r\033[K")
        self.stream.write(msg + "\n")
        if self.tty and self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def tick(self, active: dict) -> None:
        if not self.tty:
            return
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self._status = self.summary(active)[:width]
        self.stream.write("\r\033[K" + self._status)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._status:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self._status = ""


# ---------------------------------------------------------------------------------------- execution
@dataclasses.dataclass
class Failure:
    run: Run
    returncode: int | None
    reason: str

    @property
    def log_path(self) -> Path:
        return self.run.run_dir / LOG


def default_command() -> list[str]:
    custom = os.environ.get(CMD_ENV)
    return shlex.split(custom) if custom else [sys.executable, "-m", "lightning_clip", "fit"]


def _die_with(parent: int):
    """A ``preexec_fn`` (runs in the child between fork and exec) that makes the child receive SIGTERM
    when the runner dies, even by kill -9, so no training process runs on orphaned in its own session
    (Linux: prctl PR_SET_PDEATHSIG; elsewhere nothing, and `_kill_orphan` stops it on the next call).
    SIGTERM, not SIGKILL: Lightning stops at the next batch and its loader workers are shut down."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the preexec_fn should do as little as it can
    return functools.partial(launch.set_parent_death_signal, parent, libc)


def _forkable(command: Sequence[str], fork: bool) -> bool:
    """Whether ``command`` is this repository's own entry point, which `launch.Forked` can run."""
    return fork and launch.available() and list(command[:3]) == [sys.executable, "-m", "lightning_clip"]


def _start(command: list[str], log, env: dict, fork: bool):
    """A forked child (`lightning_clip.launch`) for this repository's own entry point, else a subprocess
    in its own session that dies with the runner."""
    if _forkable(command, fork):
        return launch.Forked(command[3:], log, env)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))


class _Active:
    def __init__(self, run: Run, command: list[str], env: dict, fork: bool = False):
        self.run, self.command = run, command
        clear(run.run_dir)
        run.run_dir.mkdir(parents=True)
        self.log = open(run.run_dir / LOG, "wb")
        self.log.write(f"# {shlex.join(command)}\n".encode())
        self.log.flush()
        self.start = time.monotonic()
        # its own session: Ctrl-C on the terminal reaches only the runner, which then stops the whole
        # group (dataloader workers included) and leaves no stamp; and a parent-death signal, so that a
        # runner killed with -9 takes its children with it
        self.proc = _start(command, self.log, env, fork)
        (run.run_dir / PID_FILE).write_text(f"{self.proc.pid}\n")

    def stop(self, grace: float = 5.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in lines[-n:])


def _completed_index(runs_dir: Path) -> dict[str, Path]:
    """fingerprint -> a complete run folder anywhere under runs_dir (for copying equal runs)."""
    index = {}
    for stamp_path in sorted(Path(runs_dir).glob(f"*/*/seed_*/{STAMP}")):
        stamp = read_stamp(stamp_path.parent)
        if stamp and "fingerprint" in stamp and (stamp_path.parent / METRICS).exists():
            index.setdefault(stamp["fingerprint"], stamp_path.parent)
    return index


def pending_runs(runs: Sequence[Run], progress: Progress) -> list[Run]:
    """The runs still to do (finished ones leave the progress total), with a line for each one redone and
    one for how many are complete. Shared by the local runner and the SLURM executor."""
    pending = []
    for run in runs:
        st = state(run)
        if st == "done":
            progress.total -= 1
            continue
        if st in ("partial", "stale"):
            why = "interrupted or failed before" if st == "partial" else "its configs changed since it ran"
            progress.event(f"redo {run.label}: {why} (clearing {run.run_dir})")
        pending.append(run)
    if len(runs) > len(pending):
        progress.event(f"{len(runs) - len(pending)} run(s) already complete (stamp {STAMP}); {len(pending)} to go")
    return pending


def execute(runs: Sequence[Run], *, command: Sequence[str] | None = None, jobs: int = 1,
            runs_dir: Path | None = None, progress: Progress | None = None, poll: float = 0.2,
            fork: bool = False) -> list[Failure]:
    """Run what is not complete yet; return the failures. Ctrl-C stops the children and re-raises.
    ``fork``: runs of the default command are forked from this process (`lightning_clip.launch`)."""
    prefix = list(command) if command is not None else default_command()
    progress = progress or Progress(len(runs), jobs)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # parallel runs should not fight over the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    index = _completed_index(runs_dir) if runs_dir is not None else {}
    pending = longest_first(pending_runs(runs, progress))

    failures: list[Failure] = []
    active: list[_Active] = []
    try:
        while pending or active:
            while pending and len(active) < max(1, jobs):
                run = _take_next(pending, {a.run.fingerprint for a in active})
                if run is None:
                    break  # every pending run equals an active one: wait for it, then copy
                source = index.get(run.fingerprint)
                if source is not None and source != run.run_dir:
                    clear(run.run_dir)
                    # checkpoints stay with the original: the tables and curves need metrics and events only
                    shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns(STAMP, PID_FILE, "*.ckpt"))
                    _write_stamp(run, [*prefix, *run.args], 0.0, copied_from=str(source))
                    progress.total -= 1  # like a complete run: it must not pull the ETA's mean down
                    progress.copied += 1
                    progress.event(f"copied {run.label} from {source} (same configs and seed)")
                    continue
                a = _Active(run, [*prefix, *run.args], env, fork)
                active.append(a)
                progress.event(f"start  {run.label}  -> {run.run_dir}")
            for a in list(active):
                rc = a.proc.poll()
                if rc is None:
                    continue
                active.remove(a)
                a.log.close()
                seconds = time.monotonic() - a.start
                progress.finished.append(seconds)
                (a.run.run_dir / PID_FILE).unlink(missing_ok=True)
                if rc == 0 and (a.run.run_dir / METRICS).exists():
                    _write_stamp(a.run, a.command, seconds)
                    index.setdefault(a.run.fingerprint, a.run.run_dir)
                    progress.ok += 1
                    progress.event(f"ok     {a.run.label}  {seconds:.0f}s  {progress.summary()}")
                else:
                    reason = (f"exit {rc}" if rc >= 0 else f"killed by signal {-rc}") if rc != 0 \
                        else f"exit 0 but no {METRICS}"
                    failures.append(Failure(a.run, rc, reason))
                    progress.failed += 1
                    progress.event(f"FAILED {a.run.label} ({reason}, {seconds:.0f}s): log {a.run.run_dir / LOG}\n"
                                   f"{_tail(a.run.run_dir / LOG)}\n  {progress.summary()}")
            progress.tick({a.run.label: a.start for a in active})
            if active:
                time.sleep(poll)
    except KeyboardInterrupt:
        progress.close()
        for a in active:
            a.stop()
            (a.run.run_dir / PID_FILE).unlink(missing_ok=True)
            progress.event(f"interrupted {a.run.label}: stopped, no stamp; the next call redoes it")
        raise
    finally:
        progress.close()
    return failures


# ----------------------------------------------------------------------------------------- the CLI
def write_manifest(ablation: Ablation, runs_dir: Path, seeds: Sequence[int]) -> None:
    """runs/<ablation>/ablation.json: cells, baseline and descriptions, so that the report (and the
    notebook) can be rebuilt from the runs folder alone."""
    folder = Path(runs_dir) / ablation.name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = dict(ablation=ablation.name, baseline=ablation.baseline.name, seeds=list(seeds),
                    cells=[dict(name=c.name, description=c.description, config=str(c.path)) for c in ablation.cells])
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


class _Lock:
    """One runner per runs folder: two would clear each other's unstamped runs."""

    def __init__(self, runs_dir: Path):
        self.path = Path(runs_dir) / ".ablate.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            # A POSIX record lock (lockf), not flock: it belongs to this process alone. An flock is shared
            # with every child forked while it is held (`lightning_clip.launch`), so after a kill -9 of the
            # runner its runs, still stopping on their parent-death SIGTERM, kept the folder locked
            # against the resume (which stops such orphans itself before clearing their folders).
            fcntl.lockf(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise SystemExit(f"another `python -m lightning_clip.ablate` is running on {self.path.parent} "
                             f"(lock {self.path}); wait for it to finish or stop it") from None
        return self

    def __exit__(self, *exc):
        self.f.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.ablate", description=__doc__.split("\n")[0],
                                epilog="Arguments after `--` go to every run, e.g. -- --trainer.max_steps=50.")
    p.add_argument("--ablation", nargs="+", metavar="NAME",
                   help="ablations to run (default: every folder under --ablations-dir)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per cell, 0..N-1, for every ablation (default: the ablation's '# @seeds N', else "
                        f"{DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"only the '# @quick' cells, {QUICK_CONFIG} on top, into <runs-dir>/quick and "
                        "<results-dir>/quick")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--ablations-dir", type=Path, default=ABLATIONS_DIR)
    p.add_argument("--base", type=Path, default=BASE_CONFIG, help="the config every cell is a delta over")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: a 2-core machine)")
    p.add_argument("--cmd", default=None,
                   help=f"the command a run starts with (default: `python -m lightning_clip fit`, or ${CMD_ENV})")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: child processes on this machine (default); slurm: one SLURM job per run "
                        "through submitit, with the resources of --slurm-config")
    p.add_argument("--slurm-config", type=Path, default=Path("experiments/executors/slurm.yaml"),
                   help="partition, time, nodes and GPUs per run for --executor slurm")
    p.add_argument("--no-fork", action="store_true",
                   help="start every run and evaluation as a fresh interpreter (default on Linux: forked from "
                        "this process after one import of torch, Lightning and the towers, ~5.6 s saved each)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with each run's state, run nothing")
    p.add_argument("--no-report", action="store_true", help="run only; write no tables or plots")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation suite (eval.json per run: zero-shot, probes, geometry)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = p.parse_args(argv)
    if any(a.startswith(("--run_dir", "--seed_everything")) for a in extra):
        p.error("the runner sets --run_dir and --seed_everything of each run itself")
    args.extra = extra
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


EVAL_FILE, EVAL_LOG = "eval.json", "eval.log"


def evaluate_runs(runs: Sequence[Run], jobs: int = 1, quick: bool = False, fork: bool = False) -> list[str]:
    """`python -m lightning_clip eval` on every finished run without an ``eval.json`` (new runs, and runs
    finished before the suite existed), ``jobs`` at a time; returns the failures as messages. Its tables'
    columns (zero-shot, probe, geometry) come from these files."""
    todo: list[Run] = []
    copies: list[tuple[Run, Path]] = []  # runs copied from an equal run (without its checkpoint)
    for r in runs:
        if state(r) != "done" or (r.run_dir / EVAL_FILE).exists():
            continue
        source = (read_stamp(r.run_dir) or {}).get("copied_from")
        if source:
            copies.append((r, Path(source)))
            if not (Path(source) / EVAL_FILE).exists() and all(t.run_dir != Path(source) for t in todo):
                todo.append(dataclasses.replace(r, run_dir=Path(source)))  # evaluate the original once
        elif all(t.run_dir != r.run_dir for t in todo):
            todo.append(r)
    problems = _evaluate(todo, jobs, quick, fork) if todo else []
    for run, source in copies:
        if (source / EVAL_FILE).exists():
            shutil.copy2(source / EVAL_FILE, run.run_dir / EVAL_FILE)
    return problems


def _evaluate(todo: Sequence[Run], jobs: int, quick: bool, fork: bool = False) -> list[str]:
    print(f"evaluating {len(todo)} run(s) (eval.json: zero-shot, linear probes, geometry)", flush=True)
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    extra = ["--probe_images=500"] if quick else []
    problems, active = [], []
    pending = list(todo)
    while pending or active:
        while pending and len(active) < max(1, jobs):
            run = pending.pop(0)
            log = open(run.run_dir / EVAL_LOG, "wb")
            cmd = [sys.executable, "-m", "lightning_clip", "eval", f"--ckpt_path={run.run_dir}", *extra]
            active.append((run, log, _start(cmd, log, env, fork)))
        time.sleep(0.2)
        for item in list(active):
            run, log, proc = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            if proc.returncode != 0:
                problems.append(f"eval of {run.label} failed (exit {proc.returncode}); log {run.run_dir / EVAL_LOG}: "
                                f"{_tail(run.run_dir / EVAL_LOG, 2)}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for required in [args.base, *([QUICK_CONFIG] if args.quick else [])]:
        if not Path(required).is_file():
            raise SystemExit(f"{required} not found: run from the repository root (or pass --base)")
    runs_dir = args.runs_dir / "quick" if args.quick else args.runs_dir
    results_dir = args.results_dir / "quick" if args.quick else args.results_dir
    names = args.ablation or [n for n in available(args.ablations_dir) if n not in STUDIES]
    if not names:
        raise SystemExit(f"no ablations under {args.ablations_dir}")
    ablations = [load_ablation(n, args.ablations_dir) for n in names]
    if args.quick:
        # the '# @quick' cells plus the baseline (so that the paired differences exist even in a smoke
        # run); an ablation without quick cells is left out of the smoke run
        for a in ablations:
            if not any(c.quick for c in a.cells):
                print(f"--quick: skipping ablation '{a.name}' (none of its cells is marked '# @quick')")
        ablations = [dataclasses.replace(a, cells=tuple(c for c in a.cells if c.quick or c.baseline))
                     for a in ablations if any(c.quick for c in a.cells)]
    seeds = {a.name: seeds_for(a, args.seeds, args.quick) for a in ablations}
    plans = {a.name: plan_runs(a, seeds[a.name], runs_dir, base=args.base, quick_config=QUICK_CONFIG if args.quick else None,
                               extra=args.extra, per_cell_seeds=args.seeds is None and not args.quick)
             for a in ablations}
    runs = [r for plan in plans.values() for r in plan]
    if args.dry_run:
        for r in runs:
            print(f"{state(r):8s} {r.label:45s} {r.run_dir}")
        return 0

    progress = Progress(len(runs), args.jobs)
    counts = {len(v) for v in seeds.values()}
    seed_text = (f"seeds {next(iter(seeds.values()))}" if len(counts) <= 1 and seeds else
                 "seeds per ablation " + ", ".join(f"{n}: {len(v)}" for n, v in seeds.items()))
    print(f"ablate: {', '.join(plans)}; {seed_text}; {len(runs)} runs into {runs_dir}"
          + (" (quick)" if args.quick else ""), flush=True)
    command = shlex.split(args.cmd) if args.cmd else None
    fork = not args.no_fork and args.executor == "local" and command is None and CMD_ENV not in os.environ \
        and launch.available()
    if fork:
        launch.preload()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # A runner started in the background of a non-interactive shell (`make ablate &`, nohup) inherits
    # SIGINT as ignored, and Python then keeps it ignored: kill -INT would not stop it. Stopping with
    # Ctrl-C / SIGINT is this runner's documented way to interrupt, so it always listens.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _Lock(runs_dir):
            for a in ablations:
                write_manifest(a, runs_dir, seeds[a.name])
            run_grid = execute
            if args.executor == "slurm":
                from lightning_clip import slurm

                run_grid = functools.partial(slurm.execute_slurm, options=slurm.load_options(args.slurm_config))
            if args.executor == "local":
                run_grid = functools.partial(execute, fork=fork)
            failures = run_grid(runs, command=command, jobs=args.jobs, runs_dir=runs_dir, progress=progress)
    except KeyboardInterrupt:
        print("\ninterrupted: complete runs keep their stamps; run the same command again to resume",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

    problems = [f"{f.run.label}: {f.reason}; log {f.log_path}" for f in failures]
    # the evaluation suite needs a real run's checkpoint: skipped under a stand-in fit command (tests)
    if not args.no_eval and command is None and CMD_ENV not in os.environ:
        try:
            problems += evaluate_runs(runs, jobs=args.jobs, quick=args.quick, fork=fork)
        except KeyboardInterrupt:
            print("\ninterrupted during evaluation: run the same command again to finish it", file=sys.stderr)
            return 130
    if not args.no_report:
        from lightning_clip import report

        for name, plan in plans.items():
            if not plan:
                continue
            try:
                written = report.write_report(name, runs_dir=runs_dir, results_dir=results_dir)
            except Exception as e:  # a table problem must not hide the run summary below
                problems.append(f"report of '{name}': {type(e).__name__}: {e}")
                continue
            print(f"{name}: wrote " + ", ".join(str(p) for p in written.values()))
    print(f"finished in {_hms(time.monotonic() - progress.start)}: {progress.ok} run(s) ok, "
          f"{len(failures)} failed, {progress.copied} copied, "
          f"{len(runs) - progress.total - progress.copied} already complete")
    if problems:
        print("failed:\n" + "\n".join("  " + p for p in problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
