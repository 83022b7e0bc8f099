"""`make ablate EXECUTOR=slurm`: every run of the grid as its own SLURM job, submitted through submitit.

The runner stays the same program: it plans the grid, skips complete runs, copies equal ones, stamps a
run `DONE` when its job exited 0 and left final_metrics.json, reports failures with their log, and
builds the tables. Only the "start a process, wait for it" part differs: here each run is a job with the
resources of `experiments/executors/slurm.yaml` (partition, time, nodes and GPUs per cell); a cell with several
GPUs or nodes is a Lightning DDP job (one task per GPU; Lightning reads SLURM's environment).

`cluster: local` in the YAML runs the same submission path with submitit's local executor, without
SLURM (the tests do so). The runner must stay alive while the jobs run (a login-node tmux): a run
whose job finished after the runner died has no stamp, and the next call redoes it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

import yaml

SLURM_CONFIG = Path("experiments/executors/slurm.yaml")
JOB_FILE = "JOB"  # the submitit job id of the run, beside its run.log
#: the options of experiments/executors/slurm.yaml and their defaults
OPTIONS = {
    "cluster": "slurm",        # "slurm", or "local": submitit's local executor (tests, a workstation)
    "partition": None,         # SLURM partition (None: the cluster's default)
    "time_min": 60,            # wall-clock limit of one run, minutes
    "nodes": 1,                # nodes per cell
    "gpus_per_node": 1,        # GPUs per node per cell (0: CPU jobs); one task per GPU
    "cpus_per_task": 8,        # CPU cores per task (loader workers + the training process)
    "mem_gb": None,            # memory per node, GB (None: the partition's default)
    "additional": {},          # any other sbatch option, e.g. {account: myproj, qos: high}
    "folder": None,            # submitit's job files (None: <runs-dir>/.submitit)
    "poll_s": 10.0,            # how often the runner asks for job states
}


def load_options(path: Path = SLURM_CONFIG) -> dict:
    """The executor options of ``path`` over `OPTIONS`; an unknown key is an error that lists the known."""
    try:
        given = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise SystemExit(f"--executor slurm needs its options file {path}: {e.strerror}") from None
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **given}
    if opts["cluster"] not in ("slurm", "local"):
        raise SystemExit(f"{path}: cluster={opts['cluster']!r}; choose slurm or local")
    for key in ("nodes", "time_min", "cpus_per_task"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise SystemExit(f"{path}: {key}={opts[key]!r} must be an integer >= 1")
    if not isinstance(opts["gpus_per_node"], int) or opts["gpus_per_node"] < 0:
        raise SystemExit(f"{path}: gpus_per_node={opts['gpus_per_node']!r} must be an integer >= 0")
    return opts


def trainer_args(opts: dict) -> list[str]:
    """What the fit command needs to span the job's resources (DDP over every GPU of every node)."""
    gpus, nodes = opts["gpus_per_node"], opts["nodes"]
    if gpus == 0:
        return [f"--trainer.num_nodes={nodes}"] if nodes > 1 else []
    out = ["--trainer.accelerator=gpu", f"--trainer.devices={gpus}", f"--trainer.num_nodes={nodes}"]
    if gpus * nodes > 1:
        out.append("--trainer.strategy=ddp")
    return out


def make_executor(opts: dict, folder: Path):
    try:
        import submitit
    except ImportError:
        raise SystemExit("--executor slurm needs submitit: pip install -e '.[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=opts["cluster"])
    params = dict(name="lightning-clip", timeout_min=opts["time_min"], nodes=opts["nodes"],
                  tasks_per_node=max(1, opts["gpus_per_node"]), gpus_per_node=opts["gpus_per_node"],
                  cpus_per_task=opts["cpus_per_task"])
    if opts["mem_gb"]:
        params["mem_gb"] = opts["mem_gb"]
    if opts["cluster"] == "slurm":
        if opts["partition"]:
            params["slurm_partition"] = opts["partition"]
        if opts["additional"]:
            params["slurm_additional_parameters"] = dict(opts["additional"])
    executor.update_parameters(**params)
    return executor


def run_cell(command: Sequence[str], run_dir: str) -> int:
    """The job: one task of one run (every task of a DDP cell runs it; Lightning reads its rank from
    SLURM's environment, which the command inherits). Rank 0 writes run.log, the others run.rank<k>.log."""
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBAL_RANK", "0")) or 0)
    log = Path(run_dir) / ("run.log" if rank == 0 else f"run.rank{rank}.log")
    with open(log, "ab") as out:
        return subprocess.call(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))


def execute_slurm(runs, *, command: Sequence[str] | None = None, jobs: int = 1, runs_dir: Path | None = None,
                  progress=None, options: dict | None = None, poll: float | None = None) -> list:
    """`lightning_clip.ablate.execute` through submitit: submit what is not complete, wait, stamp, report.
    ``jobs`` is ignored (the scheduler decides how many run at once). Ctrl-C cancels the jobs."""
    from lightning_clip import ablate as A

    opts = options if options is not None else load_options()
    prefix = list(command) if command is not None else A.default_command()
    progress = progress or A.Progress(len(runs), 1)
    index = A._completed_index(runs_dir) if runs_dir is not None else {}
    pending = A.pending_runs(runs, progress)
    folder = Path(opts["folder"] or Path(runs_dir or "runs") / ".submitit")
    extra = trainer_args(opts)
    executor = make_executor(opts, folder) if pending else None
    failures: list = []
    active: list[tuple] = []  # (run, job, command, start)
    try:
        for run in pending:
            source = index.get(run.fingerprint)
            if source is not None and source != run.run_dir:
                A.clear(run.run_dir)
                shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns(A.STAMP, A.PID_FILE, JOB_FILE, "*.ckpt"))
                A._write_stamp(run, [*prefix, *run.args], 0.0, copied_from=str(source))
                progress.total -= 1
                progress.copied += 1
                progress.event(f"copied {run.label} from {source} (same configs and seed)")
                continue
            A.clear(run.run_dir)
            run.run_dir.mkdir(parents=True)
            cmd = [*prefix, *run.args, *extra]
            (run.run_dir / A.LOG).write_text(f"# {shlex.join(cmd)}\n", encoding="utf-8")
            job = executor.submit(run_cell, cmd, str(run.run_dir))
            (run.run_dir / JOB_FILE).write_text(f"{job.job_id}\n")
            active.append((run, job, cmd, time.monotonic()))
            progress.event(f"submit {run.label}  -> job {job.job_id}, {run.run_dir}")
        while active:
            for item in list(active):
                run, job, cmd, start = item
                if not job.done():
                    continue
                active.remove(item)
                seconds = time.monotonic() - start
                progress.finished.append(seconds)
                try:
                    codes = job.results()
                    rc = next((c for c in codes if c), 0)
                    reason = None if rc == 0 else (f"exit {rc}" if rc > 0 else f"killed by signal {-rc}")
                except Exception as e:  # noqa: BLE001 - the scheduler's or submitit's error, reported
                    rc, reason = None, f"job {job.job_id} failed: {type(e).__name__}: {str(e).strip()[:300]}"
                if reason is None and not (run.run_dir / A.METRICS).exists():
                    reason = f"exit 0 but no {A.METRICS}"
                if reason is None:
                    A._write_stamp(run, cmd, seconds, job_id=str(job.job_id))
                    index.setdefault(run.fingerprint, run.run_dir)
                    progress.ok += 1
                    progress.event(f"ok     {run.label}  job {job.job_id}  {seconds:.0f}s  {progress.summary()}")
                else:
                    reason += f", job {job.job_id} stderr {job.paths.stderr}"
                    failures.append(A.Failure(run, rc, reason))
                    progress.failed += 1
                    progress.event(f"FAILED {run.label} ({reason}): log {run.run_dir / A.LOG}\n"
                                   f"{A._tail(run.run_dir / A.LOG)}\n  {progress.summary()}")
            progress.tick({r.label: s for r, _, _, s in active})
            if active:
                time.sleep(opts["poll_s"] if poll is None else poll)
    except KeyboardInterrupt:
        progress.close()
        for run, job, _, _ in active:
            job.cancel(check=False)
            progress.event(f"interrupted {run.label}: job {job.job_id} cancelled, no stamp; the next call redoes it")
        raise
    finally:
        progress.close()
    return failures
