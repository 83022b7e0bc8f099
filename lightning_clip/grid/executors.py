"""How a job's process is started, polled and cancelled; nothing else (the runner's loop decides what to
run, and the store what is finished).

- `Local`: a child process on this machine in its own session that dies with the runner: forked from the
  runner after one preload of the heavy imports (`grid.fork`) when the command is this repository's own
  entry point, else a fresh interpreter (`subprocess.Popen`).
- `Slurm`: one SLURM job per run through submitit, with the resources of experiments/executors/slurm.yaml
  (`cluster: local` runs the same submission path with submitit's local executor, as the tests do). A cell
  with several GPUs or nodes is a Lightning DDP job (one task per GPU; Lightning reads SLURM's environment).
  The runner must stay alive while the jobs run (a login-node tmux): a run whose job finished after the
  runner died has no stamp, and the next call redoes it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from lightning_clip.grid import fork as forking
from lightning_clip.grid.slurm import make_executor, run_cell, trainer_args
from lightning_clip.grid.store import JOB_FILE, PID_FILE, Job


@dataclasses.dataclass
class Exit:
    """How a job's process ended: its status, what to add to a failure's reason, what to stamp."""
    returncode: int | None
    note: str = ""
    info: dict = dataclasses.field(default_factory=dict)


def _die_with(parent: int):
    """A ``preexec_fn`` (runs in the child between fork and exec) that makes the child receive SIGTERM when
    the runner dies, even by kill -9, so no training process runs on orphaned in its own session (Linux:
    prctl PR_SET_PDEATHSIG; elsewhere nothing, and the store stops an orphan before redoing its folder).
    SIGTERM, not SIGKILL: Lightning stops at the next batch and its loader workers are shut down."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the preexec_fn should do as little as it can
    return functools.partial(forking.set_parent_death_signal, parent, libc)


def forkable(command: Sequence[str], fork: bool) -> bool:
    """Whether ``command`` is this repository's own entry point, which `fork.Forked` can run."""
    return fork and forking.available() and list(command[:3]) == [sys.executable, "-m", "lightning_clip"]


def worker_env(parallel: int) -> dict:
    # the report writes each run's HPARAMS session with the ablation's factors; the run then writes none
    # (callbacks/results.py HPARAMS_ENV)
    env = dict(os.environ, PYTHONUNBUFFERED="1", LIGHTNING_CLIP_HPARAMS="report")
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # parallel runs should not fight over the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


class _LocalHandle:
    def __init__(self, job: Job, proc, log):
        self.job, self.proc, self.log = job, proc, log
        self.name = ""


class Local:
    """Child processes on this machine. ``fork``: runs of `python -m lightning_clip` are forked."""
    verb = "start "

    def __init__(self, parallel: int = 1, fork: bool = False):
        self.env, self.fork = worker_env(parallel), fork

    def start(self, job: Job) -> _LocalHandle:
        log = open(job.log_path, "wb")
        log.write(f"# {shlex.join(job.command)}\n".encode())
        log.flush()
        # its own session: Ctrl-C on the terminal reaches only the runner, which then stops the whole group
        # (dataloader workers included); and a parent-death signal, so that a runner killed with -9 takes
        # its children with it
        if forkable(job.command, self.fork):
            proc = forking.Forked(job.command[3:], log, self.env)
        else:
            proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True, preexec_fn=_die_with(os.getpid()))
        (job.folder / PID_FILE).write_text(f"{proc.pid}\n")
        return _LocalHandle(job, proc, log)

    def poll(self, handle: _LocalHandle) -> Exit | None:
        rc = handle.proc.poll()
        if rc is None:
            return None
        self._release(handle)
        return Exit(rc)

    def cancel(self, handle: _LocalHandle, grace: float = 5.0) -> str:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(handle.proc.pid, sig)
            except OSError:
                pass
            try:
                handle.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._release(handle)
        return "stopped"

    @staticmethod
    def _release(handle: _LocalHandle) -> None:
        handle.log.close()
        (handle.job.folder / PID_FILE).unlink(missing_ok=True)


class _SlurmHandle:
    def __init__(self, job, submitted):
        self.job, self.submitted = job, submitted
        self.name = f"job {submitted.job_id}"


class Slurm:
    """One submitit job per run; ``options`` as `grid.slurm.load_options` returns them."""
    verb = "submit"

    def __init__(self, options: dict, folder: Path):
        self.options, self.folder = options, Path(folder)
        self.extra = trainer_args(options)
        self._executor = None

    def start(self, job: Job) -> _SlurmHandle:
        if self._executor is None:  # only when something is submitted: a finished grid needs no submitit
            self._executor = make_executor(self.options, self.folder)
        command = [*job.command, *self.extra]
        job.log_path.write_text(f"# {shlex.join(command)}\n", encoding="utf-8")
        submitted = self._executor.submit(run_cell, command, str(job.folder), job.log_name)
        (job.folder / JOB_FILE).write_text(f"{submitted.job_id}\n")
        return _SlurmHandle(job, submitted)

    def poll(self, handle: _SlurmHandle) -> Exit | None:
        submitted = handle.submitted
        if not submitted.done():
            return None
        info = {"job_id": str(submitted.job_id)}
        try:
            rc = next((c for c in submitted.results() if c), 0)
        except Exception as e:  # noqa: BLE001 - the scheduler's or submitit's error, reported
            return Exit(None, f"job {submitted.job_id} failed: {type(e).__name__}: {str(e).strip()[:300]}", info)
        return Exit(rc, f"job {submitted.job_id} stderr {submitted.paths.stderr}", info)

    def cancel(self, handle: _SlurmHandle) -> str:
        handle.submitted.cancel(check=False)
        return f"{handle.name} cancelled"
