"""Teardown for the tests' spawned gloo ranks."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def leave_together(sync_dir: str | os.PathLike, rank: int, world: int, timeout: float = 60.0) -> None:
    """Call after `destroy_process_group` and after every result is written: exit once all ranks are here.

    A rank that exits closes its gloo sockets under a peer that may still be tearing down, and the
    interpreter's own finalisation can meet gloo's threads; either aborted a rank in CI ("terminate called
    without an active exception") after every result had been written. So the ranks meet on the file system
    (no gloo left) and then leave at once, skipping finalisation.
    """
    Path(sync_dir, f"rank{rank}.closed").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(sync_dir, f"rank{r}.closed").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: another rank never finished its teardown ({sync_dir})")
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
