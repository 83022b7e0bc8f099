"""The SLURM executor's options (experiments/executors/slurm.yaml), the submitit executor they build, and
the function each job runs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

import yaml

SLURM_CONFIG = Path("experiments/executors/slurm.yaml")
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
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML: {e}") from None
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


def run_cell(command: Sequence[str], folder: str, log_name: str = "run.log") -> int:
    """The job: one task of one run (every task of a DDP cell runs it; Lightning reads its rank from
    SLURM's environment, which the command inherits). Rank 0 writes ``log_name``, the others
    ``<stem>.rank<k>.log``."""
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBAL_RANK", "0")) or 0)
    stem = log_name[:-4] if log_name.endswith(".log") else log_name
    log = Path(folder) / (log_name if rank == 0 else f"{stem}.rank{rank}.log")
    with open(log, "ab") as out:
        return subprocess.call(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", LIGHTNING_CLIP_HPARAMS="report"))
