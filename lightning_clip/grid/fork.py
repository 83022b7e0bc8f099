"""Start `python -m lightning_clip ARGS` runs without paying the interpreter's start-up each time.

A fresh interpreter spends seconds importing torch, Lightning (with torchmetrics and torchvision),
transformers and timm before a run's first step (BENCHMARKS.md, "Per-run start-up"), and `make ablate`
starts ~130 runs and as many evaluations. `Forked`
instead forks a child from the runner after one `preload()` of those modules, and the child runs the same
entry point (`lightning_clip.cli.main`) with the same arguments, log file and environment a subprocess
would have had. Linux only (fork after importing torch is not safe on macOS); `available()` says.

Fork safety: the runner must not run torch operations before forking (OpenMP's thread pool does not
survive a fork) and it does not: it only plans, copies files and writes tables. The child sets its own
thread count, signal handlers, session and parent-death signal, as the subprocess path does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO, Mapping, Sequence


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def preload() -> None:
    """Import what every run imports, once, in the process that will fork the runs."""
    import lightning_clip.cli  # noqa: F401  (torch, lightning, transformers, timm, the module, the data)
    import lightning_clip.eval.cli  # noqa: F401
    # Imported lazily by every run and evaluation, so without this each fork would import them again:
    # the default text tower's model class (transformers resolves AutoModel.from_config on first use),
    # the evaluation suite (scikit-learn) and the SummaryWriter the evaluation writes its scalars with.
    import transformers.models.bert.modeling_bert  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import lightning_clip.eval.suite  # noqa: F401


def set_parent_death_signal(parent: int, libc=None) -> None:
    """Linux: this process gets SIGTERM when ``parent`` dies, even by kill -9 (no orphaned runs). SIGTERM,
    not SIGKILL: Lightning stops at the next batch and its loader workers are shut down."""
    if libc is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # SystemExit("message"): printed, status 1, as the interpreter does
    return 1


def _child(args: Sequence[str], log: IO[bytes], env: Mapping[str, str], parent: int) -> int:
    os.setsid()  # its own session and process group: the runner stops the group (loader workers too)
    set_parent_death_signal(parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the runner's handlers are not the run's (Lightning sets its own)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # new streams on the log: the runner's may be anything (a pipe's block buffer, a test's capture)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        # OpenMP and OpenBLAS read OMP_NUM_THREADS when the runner loaded them, not now: apply the run's
        # value to every thread pool (with two BLAS threads per evaluation, its small L-BFGS products
        # for the linear probes run several times slower than in a fresh interpreter)
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(env["OMP_NUM_THREADS"]))
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from lightning_clip.cli import main

    sys.argv = ["python -m lightning_clip", *args]
    try:
        main(list(args))
        return 0
    except SystemExit as e:
        return _exit_code(e)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, status 1
        import traceback

        traceback.print_exc()
        return 1


class Forked:
    """A `subprocess.Popen`-like handle (``pid``, ``poll``, ``wait``, ``returncode``) on one forked run.

    ``args`` are what would follow ``python -m lightning_clip`` (``fit --config ...`` or ``eval ...``);
    stdout and stderr go to ``log``; ``env`` replaces the environment."""

    def __init__(self, args: Sequence[str], log: IO[bytes], env: Mapping[str, str]):
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write the runner's buffered lines into its log
        self.args, self.returncode = list(args), None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                code = _child(args, log, env, parent)
            finally:
                import gc

                gc.collect()  # loader iterators shut their workers down
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001
                        pass
                # no interpreter teardown: the runner's atexit handlers and open objects are not ours
                os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["lightning_clip", *self.args], timeout)
            time.sleep(0.05)
        return self.returncode
