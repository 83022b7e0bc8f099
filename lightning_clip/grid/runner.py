"""The one loop: run jobs (training runs, evaluations, tuning trials) through an executor, at most
``parallel`` at a time, never two with equal keys at once; report each start, success and failure; on
Ctrl-C (or SIGTERM) cancel what runs and re-raise.

Where jobs come from is a ``source``: a fixed list (`Jobs`: costly ones first) or one that creates them
as slots free up (the tuning stage asks its study for the next trial). What a job's success means, whether
it can be satisfied without running (an equal finished run copied) and whether a running job should stop
early (a pruned trial) is the ``records`` object's (`store.TrainingRuns`, `store.Evaluations`,
`tuning.Trials`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Protocol, Sequence

from lightning_clip.grid.progress import Progress
from lightning_clip.grid.store import Job, tail


class Records(Protocol):
    def satisfy(self, job: Job) -> str | None: ...
    def prepare(self, job: Job) -> None: ...
    def record(self, job: Job, seconds: float, info: dict) -> None: ...
    # optional: ``check(job) -> str | None`` while it runs (a reason to stop it early), then
    # ``stopped(job, reason, seconds)`` once it is stopped; ``failed(job, reason)`` after a failure


class Source(Protocol):
    def next(self, active_keys: set[str]) -> Job | None: ...
    def exhausted(self) -> bool: ...


class Jobs:
    """A fixed list of jobs, costly ones first (plan order among equals)."""

    def __init__(self, jobs: Sequence[Job]):
        self.pending = sorted(jobs, key=lambda j: -j.cost)

    def __len__(self) -> int:
        return len(self.pending)

    def next(self, active_keys: set[str]) -> Job | None:
        """The first pending job that no active job equals (an equal job waits, to be satisfied from that
        one when it finishes, instead of computing the same thing twice at once)."""
        for i, job in enumerate(self.pending):
            if job.key not in active_keys:
                return self.pending.pop(i)
        return None

    def exhausted(self) -> bool:
        return not self.pending


class Executor(Protocol):
    verb: str
    def start(self, job: Job): ...
    def poll(self, handle): ...
    def cancel(self, handle) -> str: ...


@dataclasses.dataclass
class Failure:
    job: Job
    returncode: int | None
    reason: str

    @property
    def log_path(self) -> Path:
        return self.job.log_path

    def __str__(self) -> str:
        return f"{self.job.label}: {self.reason}; log {self.log_path}"


def _reason(rc: int | None, note: str) -> str | None:
    """Why a job failed, from its exit status (None: the executor could not tell) and the executor's note."""
    if rc == 0:
        return None
    if rc is None:
        return note
    reason = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
    return f"{reason}, {note}" if note else reason


def run_jobs(jobs: Sequence[Job] | Source, executor: Executor, records: Records, *, parallel: int = 1,
             progress: Progress | None = None, poll: float = 0.2) -> list[Failure]:
    """Run every job of ``jobs`` (a list, or a `Source`); return the failures. A job succeeds when its
    process exits 0 and leaves its ``output`` file. Ctrl-C stops the active jobs and re-raises."""
    source = jobs if hasattr(jobs, "exhausted") else Jobs(jobs)
    progress = progress or Progress(len(source), parallel)
    check, stopped = getattr(records, "check", None), getattr(records, "stopped", None)
    failures: list[Failure] = []
    active: dict[int, tuple[Job, object, float]] = {}
    try:
        while not source.exhausted() or active:
            while len(active) < max(1, parallel):
                job = source.next({j.key for j, _, _ in active.values()})
                if job is None:
                    break  # nothing to start now (every pending job equals an active one: wait for it)
                copied = records.satisfy(job)
                if copied is not None:
                    progress.copied += 1
                    progress.event(copied)
                    continue
                records.prepare(job)
                handle = executor.start(job)
                active[id(handle)] = (job, handle, time.monotonic())
                name = getattr(handle, "name", "")
                progress.event(f"{executor.verb} {job.label}  -> {name + ', ' if name else ''}{job.folder}")
            for key, (job, handle, start) in list(active.items()):
                ended = executor.poll(handle)
                if ended is None:
                    why = check(job) if check else None
                    if why is not None:
                        executor.cancel(handle)
                        del active[key]
                        seconds = time.monotonic() - start
                        progress.finished.append(seconds)
                        stopped(job, why, seconds)
                        progress.event(f"stop   {job.label}: {why}  {seconds:.0f}s  {progress.summary()}")
                    continue
                del active[key]
                seconds = time.monotonic() - start
                progress.finished.append(seconds)
                reason = _reason(ended.returncode, ended.note)
                if reason is None and not (job.folder / job.output).exists():
                    reason = f"exit 0 but no {job.output}"
                name = f"{handle.name}  " if getattr(handle, "name", "") else ""
                if reason is None:
                    records.record(job, seconds, ended.info)
                    progress.ok += 1
                    progress.event(f"ok     {job.label}  {name}{seconds:.0f}s  {progress.summary()}")
                else:
                    failures.append(Failure(job, ended.returncode, reason))
                    if getattr(records, "failed", None):
                        records.failed(job, reason)
                    progress.failed += 1
                    progress.event(f"FAILED {job.label} ({reason}, {seconds:.0f}s): log {job.log_path}\n"
                                   f"{tail(job.log_path)}\n  {progress.summary()}")
            progress.tick({j.label: s for j, _, s in active.values()})
            if active:
                time.sleep(poll)
    except KeyboardInterrupt:
        progress.close()
        for job, handle, _ in active.values():
            what = executor.cancel(handle)
            progress.event(f"interrupted {job.label}: {what}, no stamp; the next call redoes it")
        raise
    finally:
        progress.close()
    return failures
