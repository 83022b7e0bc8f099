"""Writing files so that a reader never sees half of one: the one copy of `atomic_write`.

Used by the runner's stamps, the report's tables and figures, a run's final_metrics.json and the
evaluation's eval.json: each is read by another process (the runner, the report, a resumed run) that
must find either the previous version or the complete new one.
"""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write to `.<name>.<pid>.tmp` in the same folder, fsync, then rename over `path` (atomic on POSIX:
    the rename replaces the directory entry in one step, and the temporary file is on the same file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write (a full disk) says which file it was writing
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path
