"""What the runner's loop prints: event lines (started, finished, failed, copied) and, on a terminal, a
status line rewritten in place with what runs, how many are done and left, elapsed time and an ETA."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Iterable, TextIO


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``total`` is the number of jobs the loop was given; it never changes. Jobs end as ``finished``
    (their durations: ok or failed) or ``copied`` (satisfied without running, so they do not pull the
    ETA's mean duration down); the ETA is the mean duration of this call's finished jobs times what is left."""

    def __init__(self, total: int, jobs: int = 1, stream: TextIO | None = None):
        self.total, self.jobs = total, max(1, jobs)
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.monotonic()
        self.finished: list[float] = []
        self.ok = self.failed = self.copied = 0
        self._status = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def left(self) -> int:
        return self.total - len(self.finished) - self.copied

    def eta(self, active_elapsed: Iterable[float] = ()) -> float | None:
        if not self.finished:
            return None
        mean = sum(self.finished) / len(self.finished)
        left_work = self.left * mean - sum(min(e, mean) for e in active_elapsed)
        return max(0.0, left_work) / self.jobs

    def summary(self, active: dict | None = None) -> str:
        now = time.monotonic()
        elapsed = [now - t for t in (active or {}).values()]
        running = ", ".join(f"{label} ({hms(now - t)})" for label, t in (active or {}).items())
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"[{self.total - self.left}/{self.total} done{failed}, {self.left} left | elapsed "
                f"{hms(now - self.start)} | ETA {hms(self.eta(elapsed))}]" + (f" running {running}" if running else ""))

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
