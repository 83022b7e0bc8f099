"""Which machine setup trained a run: ``environment.json`` in the run folder, one record per fit start.

Runs of the same config and seed repeat their figures exactly on the same setup, but not always on another
one: the CPU kernels torch picks (AVX2 or AVX-512), the instruction set a virtual machine exposes, the thread
count and the library versions change the order of float reductions, and a few thousand steps turn those
last-bit differences into different recalls. A table that mixes setups should say so, and a mismatch
between two runs of the same cell should be traceable to the machine rather than guessed at; the report
reads these records (`lightning_clip.report.machines`).

A resumed run appends a record, so a run whose steps were trained on two setups shows both. Steps whose
setup is unknown (a run resumed from before the records existed, or from a checkpoint in a fresh folder) get
a placeholder record, so no table reads a partly unrecorded run as fully recorded; a damaged file is moved
aside (``environment.damaged.json``), never deleted, and its steps count as unrecorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from lightning_clip.files import atomic_write

FILENAME = "environment.json"
DAMAGED = "environment.damaged.json"
#: the setup line of steps whose setup is unknown
UNRECORDED = "not recorded"
#: the fields that can change a run's numbers; two records with equal values here trained alike
SETUP_FIELDS = ("cpu", "cpu_flags", "cpu_capability", "device", "threads", "world_size", "torch", "numpy")


def _cpuinfo() -> tuple[str, str]:
    """The CPU's model name and a short hash of its sorted feature flags (Linux; elsewhere platform's)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:8] if flags else "unknown"
    return model or platform.processor() or platform.machine() or "unknown", digest


def device_name(device: Any = None) -> str:
    """"cpu", or the accelerator's name for a CUDA device (the trainer's root device, not merely a GPU that
    is present: a CPU run on a GPU host trained on the CPU)."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def describe(world_size: int = 1, device: Any = None) -> dict[str, Any]:
    """This process's setup: CPU model and flags, torch's CPU kernel level, the device it trains on (``device``,
    default the CPU), threads, versions."""
    import numpy
    import torch

    cpu, flags = _cpuinfo()
    device = device_name(device)
    return dict(cpu=cpu, cpu_flags=flags, cpu_capability=torch.backends.cpu.get_cpu_capability(), device=device,
                threads=torch.get_num_threads(), world_size=int(world_size), torch=torch.__version__,
                numpy=numpy.__version__, python=platform.python_version(), cores=os.cpu_count())


def setup_key(record: dict[str, Any]) -> str:
    """One line naming a record's setup: equal lines, equal setups (`SETUP_FIELDS`); `UNRECORDED` for a
    placeholder."""
    if record.get("unrecorded"):
        return UNRECORDED
    r = {k: record.get(k, "?") for k in SETUP_FIELDS}
    ranks = f", {r['world_size']} ranks" if r["world_size"] not in (1, "?") else ""
    threads = f"{r['threads']} thread{'s' * (r['threads'] != 1)}"
    return (f"{r['cpu']} ({r['cpu_capability']}, flags {r['cpu_flags']}), {r['device']}, {threads}{ranks}, "
            f"torch {r['torch']}, numpy {r['numpy']}")


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's records, oldest first; [] for a run trained before runs kept them. A damaged file is an
    error naming it: it is the only account of where the run was trained."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fits = data["fits"]
        if not isinstance(fits, list) or not all(isinstance(f, dict) for f in fits):
            raise TypeError("'fits' is not a list of records")
        return fits
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable environment record ({type(e).__name__}: {e}); move it aside to "
                         "report the run's setup as not recorded") from None


def record(run_dir: str | os.PathLike, step: int = 0, world_size: int = 1, device: Any = None) -> Path:
    """This fit's setup (and the step it starts from) in ``run_dir/environment.json``, atomically: appended
    when the fit resumes (``step`` > 0), else the first record of a new run (a start from step 0 trains
    nothing of an earlier run left in the folder)."""
    fits: list[dict[str, Any]] = []
    if step > 0:
        try:
            fits = read_records(run_dir)
        except ValueError as e:  # the resume goes on; the file is kept for whoever wants to read it
            os.replace(Path(run_dir) / FILENAME, Path(run_dir) / DAMAGED)
            fits = [dict(unrecorded=f"{e}; moved to {DAMAGED}", start_step=0)]
        if not fits:  # resumed from before the records, or from a checkpoint into a fresh folder
            fits = [dict(unrecorded="the run's first steps were trained before it kept environment.json",
                         start_step=0)]
    fits.append(dict(describe(world_size, device), start_step=int(step),
                     started=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    return atomic_write(Path(run_dir) / FILENAME, json.dumps({"fits": fits}, indent=2, sort_keys=True) + "\n")
