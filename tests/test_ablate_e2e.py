"""`make ablate QUICK=1` for real, on one ablation: the real CLI, a kill -9 in the middle, the resume that
clears the interrupted run, the tables, and the notebook on what it produced."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _process import kill_group
from test_report import execute_notebook  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]


def _runner(runs: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_clip.ablate", "--quick", "--ablation", "losses",
            "--runs-dir", str(runs), "--results-dir", str(results), *extra]


@pytest.mark.slow
def test_quick_ablation_survives_kill_and_resumes(tmp_path, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # kill -9 the whole runner (and its child) as soon as the first run has started writing events
    proc = subprocess.Popen(_runner(runs, results), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("**/events.out.tfevents.*")):
        time.sleep(0.5)
    assert list(runs.glob("**/events.out.tfevents.*")), "no run started within 240 s"
    kill_group(proc)
    interrupted = [p.parent for p in runs.glob("**/events.out.tfevents.*") if not (p.parent / "DONE").exists()]
    assert interrupted, "the killed run must not be stamped"

    done = subprocess.run(_runner(runs, results), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # quick mode keeps its own folders, so it never mixes with a full run's stamps
    runs, results = runs / "quick", results / "quick"
    stamps = sorted(p.parent.relative_to(runs).as_posix() for p in runs.glob("**/DONE"))
    assert stamps == ["losses/infonce/seed_0", "losses/siglip/seed_0",
                      "losses_tuned/infonce/seed_0", "losses_tuned/siglip/seed_0"]  # default recipe, then tuned
    assert all((runs / s / "final_metrics.json").is_file() for s in stamps)
    table = (results / "losses.md").read_text()  # the confirm stage's test-split table
    assert "infonce" in table and "siglip" in table and "held-out test split" in table
    assert (results / "losses_default.md").is_file() and (results / "losses_tuning.md").is_file()

    # a third call has nothing left to do
    again = subprocess.run(_runner(runs.parent, results.parent), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr

    outputs = execute_notebook(tmp_path, monkeypatch, runs, results)
    assert any("image/png" in o.get("data", {}) for o in outputs)
