"""What `python -m lightning_clip fit` checks and holds in a run folder before it writes anything there:
one owner at a time (`RunFolderLock`), a checkpoint that can be read (`check_checkpoint`), and a run that
failed to write its files not left looking finished (`mark_unfinished`); and where a finished run keeps
its checkpoint (`find_checkpoint`: evaluation and a frozen teacher both read it).

Refusals raise `UserError`: one line ``error: ...`` on stderr and exit status 2 (`lightning_clip.cli.main`
prints it), like the parser's own errors; tracebacks are left to bugs.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

LOCK_FILE = "fit.lock"
#: where a run that failed to write its files moves final_metrics.json (kept for diagnosis; nothing that
#: looks for a finished run reads this name)
UNFINISHED = "final_metrics.unfinished.json"


class UserError(SystemExit):
    """A refusal of the user's input or environment, not a bug: exit status 2, ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message if message.startswith("error: ") else f"error: {message}"

    def __str__(self) -> str:
        return self.message


class RunFolderLock:
    """One fit per run folder: a POSIX record lock (lockf) on ``<run_dir>/fit.lock``, held by the fitting
    process until it ends (the OS drops it on exit, kill -9 included). A record lock belongs to one
    process, not to the children it forks, so a run forked by the ablation runner owns its own folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.f = None

    def acquire(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"--run_dir={self.path.parent}: another fit (pid {owner}) is running in this folder "
                            f"(lock {self.path}); wait for it to end, stop it, or choose another --run_dir") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.f = f
        return self

    def release(self) -> None:
        if self.f is not None:
            self.f.close()  # closing drops the lock
            self.f = None


def check_checkpoint(path: Path, option: str = "--ckpt_path") -> None:
    """Refuse a checkpoint that is missing, empty or cut short, naming it, before the run writes anything.

    Memory-mapped: the tensors are not read, only the archive's directory and the pickled structure."""
    import torch

    if not path.is_file():
        raise UserError(f"{option}={path}: no such checkpoint file")
    size = path.stat().st_size
    try:
        if size == 0:
            raise EOFError("the file is empty")
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors ...
        raise UserError(f"{option}: {path} ({size} bytes) is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}); it was cut short or emptied "
                        "(a full disk, a killed copy?). Resume an earlier checkpoint with --ckpt_path=PATH, or "
                        "start over with --overwrite=true") from None


def write_error(e: BaseException) -> Optional[OSError]:
    """The OSError of a failed write (no space, quota, read-only file system) behind ``e``, or None."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def mark_unfinished(run_dir: Path, metrics_name: str) -> Optional[Path]:
    """Move final_metrics.json aside (a rename needs no free space), so that neither the ablation runner,
    the report nor a resume reads a run that failed to write its checkpoint or metrics as finished."""
    src = Path(run_dir) / metrics_name
    if not src.exists():
        return None
    dst = src.with_name(UNFINISHED)
    os.replace(src, dst)
    return dst


def find_checkpoint(path: str | os.PathLike, option: str = "--ckpt_path", hint: str = "") -> Path:
    """The checkpoint file of ``path``: the file itself, or of a run folder its ``checkpoints/last.ckpt``,
    else the newest ``*.ckpt`` there. ``option`` names the setting in the error, ``hint`` what to do."""
    p = Path(path)
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        last = folder / "last.ckpt"
        found = [last] if last.exists() else sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{option}={path}: no checkpoint in {folder} (a finished run keeps one "
                                    f"under RUN/checkpoints){hint}")
        return found[-1]
    if not p.exists():
        raise FileNotFoundError(f"{option}={path} does not exist{hint}")
    return p
