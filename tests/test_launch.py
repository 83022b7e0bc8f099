"""lightning_clip.grid.fork: runs forked from the runner behave like `python -m lightning_clip` subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_clip.grid import fork as launch
from lightning_clip.grid.executors import Local, forkable
from lightning_clip.grid.store import Job

pytestmark = pytest.mark.skipif(not launch.available(), reason="forked runs are Linux-only")


@pytest.fixture
def entry(monkeypatch, tmp_path):
    """Replaces the entry point the child calls (fork copies this process, patch included) with one that
    reports what the child sees, then behaves as ``argv`` asks: exit with a code, sleep, or raise."""
    import lightning_clip.cli as cli

    def fake_main(args):
        import torch
        from threadpoolctl import threadpool_info

        print(json.dumps({"args": args, "argv": sys.argv, "pid": os.getpid(), "sid": os.getsid(0),
                          "threads": torch.get_num_threads(), "env": os.environ.get("FORK_TEST"),
                          "blas": sorted({p["num_threads"] for p in threadpool_info()}),
                          "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}), flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        if args[0] == "exit":
            raise SystemExit(int(args[1]))
        if args[0] == "message":
            raise SystemExit("a message for the user")
        if args[0] == "raise":
            raise ValueError("data.train_shards: no such folder")
        if args[0] == "sleep":
            import time

            time.sleep(60)

    monkeypatch.setattr(cli, "main", fake_main)
    return tmp_path


def _run(tmp_path: Path, args: list[str], **env) -> tuple[int, str, dict]:
    with open(tmp_path / "log", "wb") as log:
        child = launch.Forked(args, log, {**os.environ, **env})
        rc = child.wait(60)
    text = (tmp_path / "log").read_text()
    return rc, text, json.loads(text.splitlines()[0])


def test_the_child_gets_its_arguments_environment_threads_session_and_log(entry):
    rc, text, seen = _run(entry, ["exit", "0", "--x=1"], OMP_NUM_THREADS="1", FORK_TEST="yes")
    assert rc == 0 and seen["args"] == ["exit", "0", "--x=1"] and seen["argv"][1:] == seen["args"]
    assert seen["env"] == "yes" and seen["threads"] == 1 and seen["blas"] == [1]
    assert seen["sid"] == seen["pid"] != os.getsid(0)  # its own session: the runner can stop its group
    assert seen["sigterm_default"] and "to stderr" in text  # stdout and stderr both in the log


@pytest.mark.parametrize("args, code, shown", [(["exit", "3"], 3, None), (["message"], 1, "a message for the user"),
                                               (["raise"], 1, "ValueError: data.train_shards: no such folder")])
def test_exit_codes_and_errors_are_those_of_an_interpreter(entry, args, code, shown):
    rc, text, _ = _run(entry, args)
    assert rc == code
    if shown:
        assert shown in text


def test_the_runner_stops_a_forked_run_and_its_group(entry):
    (entry / "run").mkdir()
    job = Job("toy/a seed 0", entry / "run", [sys.executable, "-m", "lightning_clip", "sleep"], "run.log",
              "final_metrics.json", "f", run=None)
    executor = Local(fork=True)
    handle = executor.start(job)
    assert isinstance(handle.proc, launch.Forked) and (entry / "run" / "PID").is_file()
    with pytest.raises(subprocess.TimeoutExpired):  # still sleeping
        handle.proc.wait(1)
    assert executor.poll(handle) is None
    assert executor.cancel(handle, grace=5) == "stopped"
    assert handle.proc.returncode == -signal.SIGTERM and not (entry / "run" / "PID").exists()
    # only this repository's own entry point is forked; any other command is a subprocess
    assert not forkable([sys.executable, "other.py"], True)
    assert not forkable([sys.executable, "-m", "lightning_clip", "fit"], False)


def test_preload_covers_what_a_default_run_and_its_evaluation_import_later():
    # each forked run or evaluation pays again for any module it imports lazily (the default text tower's
    # model class alone took ~0.5 s): after preload, building the base model and importing the
    # evaluation suite must import nothing new from transformers, timm or scikit-learn
    script = (
        "import sys, yaml\n"
        "from lightning_clip.grid import fork as launch\n"
        "launch.preload()\n"
        "before = set(sys.modules)\n"
        "from lightning_clip.module import ClipModule\n"
        "ClipModule(**yaml.safe_load(open('experiments/base.yaml'))['model'])\n"
        "import lightning_clip.eval.suite\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('transformers', 'timm', 'sklearn', 'tensorboard'))\n"
        "print(len(new), new[:10])\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0 []"
