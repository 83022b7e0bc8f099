"""The ablation runner with a fake training command: skip complete runs, redo interrupted ones, go on after
a failure, survive kill -9 of a child or of the runner, stop children on Ctrl-C; and the shipped cells."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lightning_clip.grid import cells, cli, plan, store
from lightning_clip.grid.executors import Exit, Local
from lightning_clip.grid.progress import Progress

from _process import kill_group

REPO = Path(__file__).resolve().parents[1]

# Stands in for `python -m lightning_clip fit`: takes the same arguments, reads its behaviour from a
# `fake:` block of the cell YAML (sleep, fail, no_metrics), records each invocation, writes metrics.
FAKE = textwrap.dedent("""\
    import json, os, sys, time
    import yaml
    args = sys.argv[1:]
    opt = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))
    run_dir, seed = opt("run_dir"), int(opt("seed_everything"))
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    fake = {}
    for c in configs:
        fake.update((yaml.safe_load(open(c)) or {}).get("fake") or {})
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"run_dir": run_dir, "pid": os.getpid(), "configs": configs, "args": args}) + "\\n")
    print("training", run_dir, flush=True)
    time.sleep(float(fake.get("sleep", 0)))
    if fake.get("fail"):
        print("loss is NaN at step 3", flush=True)
        sys.exit(3)
    if not fake.get("no_metrics"):
        m = {"val/t2i/R@1": 0.3 + 0.01 * seed, "val/i2t/R@1": 0.35, "train/loss": 1.0, "step": 10, "loss_family": "x"}
        with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
            json.dump(m, f)
""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tiny project tree (base, quick overlay, one ablation with two cells) as the working directory."""
    (tmp_path / "experiments" / "ablations" / "toy").mkdir(parents=True)
    (tmp_path / "experiments" / "base.yaml").write_text("trainer: {max_steps: 10}\n")
    (tmp_path / "experiments" / "quick.yaml").write_text("trainer: {max_steps: 2}\n")
    cell(tmp_path, "toy", "a", "# the reference\n# @baseline\n# @quick\nmodel: {loss: infonce}\n")
    cell(tmp_path, "toy", "b", "# the other loss\nmodel: {loss: siglip}\n")
    (tmp_path / "fake.py").write_text(FAKE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv(cli.CMD_ENV, f"{sys.executable} {tmp_path / 'fake.py'}")
    return tmp_path


def cell(root: Path, ablation: str, name: str, text: str) -> Path:
    path = root / "experiments" / "ablations" / ablation / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def calls(root: Path) -> list[dict]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_dirs(root: Path, ablation: str = "toy", runs: str = "runs") -> list[str]:
    return sorted(str(p.parent.relative_to(root / runs)) for p in (root / runs).glob(f"{ablation}/*/seed_*/DONE"))


# ------------------------------------------------------------------------------------------- cells
def test_parse_cell_reads_description_and_directives(tmp_path):
    c = cells.parse_cell(cell(tmp_path, "real", "x", "# what it tests\n# @baseline\n"
                                                      "# @data REAL_SHARDS ../shared/data/x\nmodel: {}\n"), "real")
    assert (c.name, c.description, c.baseline, c.quick) == ("x", "what it tests", True, False)
    assert c.data_root({}) == Path("../shared/data/x") and c.data_root({"REAL_SHARDS": "/d"}) == Path("/d")
    with pytest.raises(ValueError, match="unknown directive '# @basline'"):
        cells.parse_cell(cell(tmp_path, "t", "y", "# typo\n# @basline\n"), "t")
    with pytest.raises(ValueError, match="one-line comment"):
        cells.parse_cell(cell(tmp_path, "t", "z", "model: {loss: infonce}\n"), "t")


def test_seeds_directive_parses_per_cell(project):
    c = cells.parse_cell(cell(project, "toy", "c", "# one seed is enough\n# @seeds 1\nmodel: {}\n"), "toy")
    assert c.seeds == 1 and cells.parse_cell(project / "experiments/ablations/toy/a.yaml", "toy").seeds is None
    for bad in ("# @seeds", "# @seeds two", "# @seeds 0", "# @seeds 1 2"):
        with pytest.raises(ValueError, match="'# @seeds' takes one positive integer"):
            cells.parse_cell(cell(project, "t", "bad", f"# bad\n{bad}\n"), "t")
    a = cells.load_ablation("toy")  # a (no directive: 3 seeds), c (1 seed): the ablation plans 3
    assert a.default_seeds == 3 and cells.seeds_for(a) == [0, 1, 2]
    assert cells.seeds_for(a, cli_seeds=2) == [0, 1] and cells.seeds_for(a, quick=True) == [0]
    cell(project, "toy", "b", "# the other loss\n# @seeds 5\nmodel: {loss: siglip}\n")
    assert cells.load_ablation("toy").default_seeds == 5  # cells may differ: the most wins


def test_seeds_directive_sets_each_cells_seeds_and_the_command_line_overrides(project, capsys):
    cell(project, "one", "a", "# the reference\n# @baseline\n# @seeds 2\nmodel: {loss: infonce}\n")
    cell(project, "one", "b", "# the other\n# @quick\n# @seeds 1\nmodel: {loss: siglip}\n")
    assert cli.main(["--no-report"]) == 0  # toy: no directive, 3 seeds; one: a 2 seeds, b 1 seed
    assert run_dirs(project, "one") == ["one/a/seed_0", "one/a/seed_1", "one/b/seed_0"]
    assert len(run_dirs(project, "toy")) == 6
    assert "seeds per ablation one: 2, toy: 3" in capsys.readouterr().out
    assert json.loads((project / "runs/one/ablation.json").read_text())["seeds"] == [0, 1]
    assert cli.main(["--ablation", "one", "--seeds", "3", "--no-report"]) == 0  # every cell, 3 seeds
    assert run_dirs(project, "one")[-1] == "one/b/seed_2" and len(run_dirs(project, "one")) == 6
    assert cli.main(["--ablation", "one", "--quick", "--no-report"]) == 0
    assert run_dirs(project, "one", runs="runs/quick") == ["one/a/seed_0", "one/b/seed_0"]  # 1 seed
    capsys.readouterr()
    assert cli.main(["--ablation", "one", "--dry-run"]) == 0
    plan = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert plan == ["done"] * 3  # the per-cell default again, all complete


def test_ablation_needs_one_baseline(project):
    cell(project, "toy", "b", "# the other loss\n# @baseline\nmodel: {loss: siglip}\n")
    with pytest.raises(SystemExit, match="exactly one cell marked '# @baseline'"):
        cells.load_ablation("toy")
    with pytest.raises(SystemExit, match="unknown ablation 'nope'.*available: toy"):
        cells.load_ablation("nope")


def test_shipped_ablations_are_well_formed():
    root = REPO / "experiments" / "ablations"
    names = cells.available(root)
    assert names[:10] == ["losses", "batch_size", "batch_steps", "batch_pairs", "batch_steps_b128", "gcl_scale",
                          "gcl_rho", "batch16", "duplicates", "variance"]
    assert "real" in names
    # studies run only when named: the budget studies, and the teacher the duplicates ablation requires
    studies = {"convergence", "batch_convergence", "teacher"}
    assert studies <= set(names) and all(cells.load_ablation(n, root).study for n in studies)
    assert not any(cells.load_ablation(n, root).study for n in names if n not in studies)
    for name in names:
        a = cells.load_ablation(name, root)
        assert a.cells[0].baseline
        for c in a.cells:
            delta = yaml.safe_load(c.path.read_text())
            assert set(delta) <= {"model", "data", "trainer"}, c.path
            assert "callbacks" not in (delta.get("trainer") or {}), f"{c.path}: cells never touch trainer.callbacks"
    losses = {c.name for c in cells.load_ablation("losses", root).cells}
    assert {"soft_targets-tutorial", "soft_targets-fixed", "probabilistic-proposal", "probabilistic-gaussian",
            "infonce", "siglip", "multi_positive", "nce", "dcl", "damsm"} <= losses
    # the convergence study runs every family of `losses`, each for the same (longer) budget
    conv = cells.load_ablation("convergence", root)
    assert {c.name for c in conv.cells} == losses
    assert len({yaml.safe_load(c.path.read_text())["trainer"]["max_steps"] for c in conv.cells}) == 1

    def shape(c):
        d = yaml.safe_load(c.path.read_text())
        return d["data"]["batch_size"], d["trainer"]["max_steps"]

    # equal pairs: every batch size sees the same number of training pairs, so only the batch differs;
    # equal steps: every batch size takes the same number of optimizer steps
    sizes = {c.name: shape(c) for c in cells.load_ablation("batch_size", root).cells}
    assert len({b * s for b, s in sizes.values()}) == 1 and len({b for b, _ in sizes.values()}) >= 3
    steps = {c.name: shape(c) for c in cells.load_ablation("batch_steps", root).cells}
    assert len({s for _, s in steps.values()}) == 1
    assert set(steps) <= set(sizes)
    # converged budgets: every cell at least the steps InfoNCE needs at its batch to come within 2 points
    # of its own plateau (results/batch_convergence.md), and both views on the test protocol
    needed = {16: 10240, 64: 2000, 128: 1280}
    assert all(s >= needed[b] for b, s in [*sizes.values(), *steps.values()])
    # equal pairs again at batch_steps' budget for batch 64, where batch_size's 2,560 steps fell short of
    # the plateau: its batch-64 cells must be batch_steps' own (same delta, so the runner copies them)
    pairs = cells.load_ablation("batch_pairs", root).cells
    assert len({b * s for b, s in map(shape, pairs)}) == 1 and {b for b, _ in map(shape, pairs)} == {16, 64, 128}
    by_name = {c.name: c for c in cells.load_ablation("batch_steps", root).cells}
    for c in pairs:
        if shape(c)[0] == 64:
            assert yaml.safe_load(c.path.read_text()) == yaml.safe_load(by_name[c.name].path.read_text()), c.name
    assert cells.load_ablation("batch_size", root).confirm["seeds"] >= 5
    # batch_steps' batch-128 gap on 5 seeds: the same two cells (so a full make ablate copies seeds 0-2)
    b128 = cells.load_ablation("batch_steps_b128", root)
    assert b128.confirm["seeds"] >= 5 and {c.name for c in b128.cells} == {"infonce-b128", "siglip-b128"}
    for c in b128.cells:
        assert yaml.safe_load(c.path.read_text()) == yaml.safe_load(by_name[c.name].path.read_text()), c.name
    # the duplicate-aware comparison needs an image several times in a batch, and the false-negative
    # settings differ in the training captions only
    for c in cells.load_ablation("duplicates", root).cells:
        assert yaml.safe_load(c.path.read_text())["data"]["batching"] == "caption", c.name
    assert all(c.data for c in cells.load_ablation("real", root).cells)
    # batch16 differs from gcl_rho's cells by the tuning alone: both families at batch 16's converged
    # budget, each with its own search space, no setting carried from batch 64, confirmed on 5 seeds
    b16 = cells.load_ablation("batch16", root)
    assert b16.tune and b16.confirm["seeds"] >= 5 and {c.name for c in b16.cells} == {"infonce", "gcl"}
    assert {shape(c) for c in b16.cells} == {(16, needed[16])}
    assert all(c.search and "@from" not in c.path.read_text() for c in b16.cells)


# ------------------------------------------------------------------------------------------ runner
def test_runs_everything_then_skips_complete_runs(project, capsys):
    assert cli.main(["--seeds", "2"]) == 0
    assert run_dirs(project) == ["toy/a/seed_0", "toy/a/seed_1", "toy/b/seed_0", "toy/b/seed_1"]
    assert len(calls(project)) == 4
    first = calls(project)[0]["args"]
    assert first[:4] == ["--config", "experiments/base.yaml", "--config", "experiments/ablations/toy/a.yaml"]
    assert "--seed_everything=0" in first and "--run_dir=runs/toy/a/seed_0" in first
    assert (project / "results" / "toy.md").exists() and (project / "results" / "toy.csv").exists()
    manifest = json.loads((project / "runs" / "toy" / "ablation.json").read_text())
    assert manifest["baseline"] == "a" and [c["name"] for c in manifest["cells"]] == ["a", "b"]
    out = capsys.readouterr().out
    assert "[4/4 done, 0 left" in out and "ETA" in out

    assert cli.main(["--seeds", "2"]) == 0
    assert len(calls(project)) == 4, "complete runs are not run again"
    assert "4 run(s) already complete" in capsys.readouterr().out


def test_interrupted_run_is_cleared_and_redone(project):
    partial = project / "runs" / "toy" / "a" / "seed_0"
    partial.mkdir(parents=True)
    (partial / "events.out.tfevents.half").write_text("half a run")  # no DONE stamp: interrupted
    assert cli.main(["--seeds", "1"]) == 0
    assert not (partial / "events.out.tfevents.half").exists() and (partial / "DONE").exists()
    assert [c["run_dir"] for c in calls(project)] == ["runs/toy/a/seed_0", "runs/toy/b/seed_0"]


def test_failure_is_reported_with_its_log_and_the_others_run(project, capsys):
    cell(project, "toy", "b", "# the other loss\nmodel: {loss: siglip}\nfake: {fail: true}\n")
    cell(project, "toy", "c", "# no metrics written\nfake: {no_metrics: true}\n")
    assert cli.main(["--seeds", "1"]) == 1
    assert run_dirs(project) == ["toy/a/seed_0"]
    captured = capsys.readouterr()
    log = Path("runs/toy/b/seed_0/run.log")
    assert f"FAILED toy/b seed 0 (exit 3" in captured.out and f"log {log}" in captured.out
    assert "loss is NaN at step 3" in captured.out  # the tail of the log, to see why without opening it
    assert f"toy/b seed 0: exit 3; log {log}" in captured.err
    assert "toy/c seed 0: exit 0 but no final_metrics.json" in captured.err
    assert "loss is NaN" in (project / log).read_text()
    # the table is still written from what finished
    assert "| `a` (baseline) | 1 |" in (project / "results" / "toy.md").read_text()


def test_stale_run_is_redone_when_its_config_changes(project, capsys):
    assert cli.main(["--seeds", "1"]) == 0
    cell(project, "toy", "b", "# the other loss, with a comment edit\nmodel: {loss: siglip}  # same\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert len(calls(project)) == 2, "a comment does not change a run"
    cell(project, "toy", "b", "# the other loss\nmodel: {loss: siglip, lr: 0.1}\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert [c["run_dir"] for c in calls(project)][2:] == ["runs/toy/b/seed_0"]
    assert "redo toy/b seed 0: its configs changed" in capsys.readouterr().out


def test_equal_runs_are_copied_not_recomputed(project, capsys):
    cell(project, "zz_other", "a", "# the same reference\n# @baseline\nmodel: {loss: infonce}\n")
    assert cli.main(["--seeds", "1", "--ablation", "toy", "zz_other"]) == 0
    assert len(calls(project)) == 2
    copied = project / "runs" / "zz_other" / "a" / "seed_0"
    assert json.loads((copied / "DONE").read_text())["copied_from"] == "runs/toy/a/seed_0"
    assert (copied / "final_metrics.json").exists()
    assert "copied zz_other/a seed 0" in capsys.readouterr().out


def test_equal_runs_are_not_trained_at_once_with_two_jobs(project, capsys):
    # With two slots, the copy of toy/a would otherwise start beside toy/a and train the same thing
    cell(project, "zz_other", "a", "# the same reference\n# @baseline\nmodel: {loss: infonce}\n")
    # planned zz_other/a, toy/a, toy/b: the first two are equal, so toy/b takes the second slot
    assert cli.main(["--seeds", "1", "--jobs", "2", "--ablation", "zz_other", "toy"]) == 0
    assert sorted(c["run_dir"] for c in calls(project)) == ["runs/toy/b/seed_0", "runs/zz_other/a/seed_0"]
    assert "copied toy/a seed 0 from runs/zz_other/a/seed_0" in capsys.readouterr().out


def test_longest_runs_start_first_plan_order_among_equals(project):
    cell(project, "toy", "c", "# longer\ntrainer: {max_steps: 30}\n")
    cell(project, "toy", "d", "# bigger batches, fewer steps: 20 x 8 = 160 samples\ntrainer: {max_steps: 20}\n"
         "data: {batch_size: 8}\n")
    (project / "experiments" / "base.yaml").write_text("trainer: {max_steps: 10}\ndata: {batch_size: 4}\n")
    runs = plan.plan_runs(cells.load_ablation("toy", project / "experiments" / "ablations"), [0, 1],
                            project / "runs", base=project / "experiments" / "base.yaml")
    assert {r.cell.name: r.cost for r in runs} == {"a": 40, "b": 40, "c": 120, "d": 160}
    order = [(r.cell.name, r.seed) for r in plan.longest_first(runs)]
    assert order == [("d", 0), ("d", 1), ("c", 0), ("c", 1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert cli.main(["--seeds", "2"]) == 0
    assert [c["run_dir"].split("/")[2] for c in calls(project)] == [n for n, _ in order]
    # an override on the command line counts too
    more = plan.plan_runs(cells.load_ablation("toy", project / "experiments" / "ablations"), [0],
                            project / "runs", base=project / "experiments" / "base.yaml",
                            extra=["--trainer.max_steps=100"])
    assert {r.cost for r in more} == {400, 800}


def test_quick_mode_keeps_its_own_folders(project):
    assert cli.main(["--quick"]) == 0
    assert run_dirs(project, runs="runs/quick") == ["toy/a/seed_0"]  # the @quick cell, one seed
    assert not (project / "runs" / "toy").exists() and (project / "results" / "quick" / "toy.md").exists()
    assert calls(project)[0]["configs"][-1] == "experiments/quick.yaml"


def test_missing_data_skips_the_cell(project, capsys, monkeypatch):
    cell(project, "toy", "real", "# on real photos\n# @data TOY_SHARDS shards/absent\nmodel: {}\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert "skipping toy/real: its shards folder shards/absent" in capsys.readouterr().out
    (project / "mine" / "train").mkdir(parents=True)
    (project / "mine" / "val").mkdir()
    monkeypatch.setenv("TOY_SHARDS", "mine")
    assert cli.main(["--seeds", "1"]) == 0
    assert "--data.train_shards=mine/train" in calls(project)[-1]["args"]


def test_extra_arguments_go_to_every_run(project):
    assert cli.main(["--seeds", "1", "--", "--trainer.max_steps=3"]) == 0
    assert all("--trainer.max_steps=3" in c["args"] for c in calls(project))


# ------------------------------------------------------------------------------- signals (processes)
def _start_runner(project: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    # sigint_ignored: as a runner started with `&` from a non-interactive shell inherits SIGINT
    return subprocess.Popen([sys.executable, "-m", "lightning_clip.ablate", "--seeds", "1", "--no-report", *args],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)


def _wait_for_call(project: Path, n: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = calls(project)
        if len(c) >= n:
            return c[n - 1]
        time.sleep(0.05)
    raise AssertionError(f"the fake command was not started {n} time(s) within {timeout}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_kill_9_of_a_child_fails_that_run_and_a_rerun_redoes_it(project):
    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\nfake: {sleep: 30}\n")
    runner = _start_runner(project)
    child = _wait_for_call(project, 1)
    os.kill(child["pid"], signal.SIGKILL)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1
    assert "FAILED toy/a seed 0 (killed by signal 9" in out and "log runs/toy/a/seed_0/run.log" in out
    assert run_dirs(project) == ["toy/b/seed_0"], "the other cell still ran"

    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert run_dirs(project) == ["toy/a/seed_0", "toy/b/seed_0"]


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "background-started"])
def test_ctrl_c_stops_the_child_and_leaves_no_stamp(project, sigint_ignored):
    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\nfake: {sleep: 30}\n")
    runner = _start_runner(project, sigint_ignored=sigint_ignored)
    child = _wait_for_call(project, 1)
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 130, out
    assert "interrupted toy/a seed 0" in out
    assert not _alive(child["pid"]), "the child is stopped with the runner"
    assert run_dirs(project) == [] and (project / "runs" / "toy" / "a" / "seed_0").exists()


def test_kill_9_of_the_runner_then_resume(project, capsys):
    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\nfake: {sleep: 60}\n")
    runner = _start_runner(project)
    child = _wait_for_call(project, 1)
    runner.kill()  # no chance to clean up; the child (own session) still gets its parent-death signal
    runner.communicate(timeout=30)
    deadline = time.monotonic() + 30  # a hang guard, not a timing: the sleep would last 60 s
    while _alive(child["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child["pid"]), "the child of a runner killed with -9 dies with it, not orphaned"

    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert run_dirs(project) == ["toy/a/seed_0", "toy/b/seed_0"]
    assert "redo toy/a seed 0: interrupted" in capsys.readouterr().out


def test_an_orphan_left_running_is_stopped_before_its_folder_is_redone(project, capsys):
    # the backstop where no parent-death signal exists: a training process of an earlier runner, still
    # running, named in its folder's PID file
    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\n")
    run_dir = Path("runs/toy/a/seed_0")
    run_dir.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--run_dir={run_dir}"],
                              start_new_session=True)
    (run_dir / store.PID_FILE).write_text(f"{orphan.pid}\n")
    assert cli.main(["--seeds", "1"]) == 0
    assert orphan.wait(timeout=30) == -signal.SIGKILL
    assert "redo toy/a seed 0: interrupted" in capsys.readouterr().out


def test_a_second_runner_on_the_same_folder_is_refused(project):
    cell(project, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\nfake: {sleep: 30}\n")
    runner = _start_runner(project)
    try:
        _wait_for_call(project, 1)
        with pytest.raises(SystemExit, match="another `python -m lightning_clip.ablate` is running"):
            cli.main(["--seeds", "1"])
    finally:
        runner.send_signal(signal.SIGINT)
        runner.communicate(timeout=30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked runs are POSIX-only")
def test_the_lock_is_the_runners_alone_not_its_forked_childrens(tmp_path):
    # A run forked while the runner holds the lock must not keep the folder locked once the runner is
    # gone (after a kill -9 the runs take a moment to stop on their parent-death signal)
    holder = textwrap.dedent(f"""\
        import os, sys, time
        from lightning_clip.grid import store
        lock = store.Lock({str(tmp_path)!r}).__enter__()
        if os.fork() == 0:
            time.sleep(20)  # the child: outlives its parent, holding the inherited descriptor
            os._exit(0)
        print("locked", flush=True)
        time.sleep(1)
        os._exit(0)  # the runner dies without releasing anything itself
        """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="another"):
            store.Lock(tmp_path).__enter__().f.close()  # refused while the runner lives (other process)
        proc.wait(timeout=30)
        store.Lock(tmp_path).__enter__().f.close()  # the runner is gone, its child is not: free
    finally:
        kill_group(proc)  # and the sleeping child


def test_progress_line_and_eta():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = Progress(total=10, jobs=2, stream=stream)
    assert p.eta() is None and "ETA ?" in p.summary()
    p.finished += [20.0, 40.0]  # mean 30 s; 8 runs left on 2 jobs, one of them 10 s in
    assert p.eta([10.0]) == pytest.approx((8 * 30 - 10) / 2)
    p.tick({"losses/nce seed 1": time.monotonic() - 10})
    p.event("ok     losses/dcl seed 0")
    out = stream.getvalue()
    assert "[2/10 done, 8 left" in out and "running losses/nce seed 1 (0m1" in out
    # an event clears the status line, prints, and redraws it below
    assert out.index("\r\033[Kok     losses/dcl seed 0\n") < out.rindex("running losses/nce")


# ------------------------------------------------------------------------------------ evaluation suite
class InProcess:
    """An executor that finishes each job at once in this process: the evaluation writes its eval.json
    naming the folder it evaluated. The loop and the store are the real ones."""
    verb = "start "

    def __init__(self):
        self.started = []

    def start(self, job):
        self.started.append(str(job.folder))
        (job.folder / job.output).write_text(json.dumps([{"run": str(job.folder)}]))
        return job

    def poll(self, handle):
        return Exit(0)

    def cancel(self, handle):
        return "stopped"


def test_finished_runs_get_evaluated_once_and_copies_share_their_originals_eval(project):
    cell(project, "zz_other", "a", "# the same reference\n# @baseline\nmodel: {loss: infonce}\n")
    assert cli.main(["--seeds", "1", "--ablation", "toy", "zz_other"]) == 0  # the fake skips eval
    ablation = [cells.load_ablation(n) for n in ("toy", "zz_other")]
    runs = [r for a in ablation for r in plan.plan_runs(a, [0], Path("runs"))]
    executor = InProcess()
    assert cli.evaluate(runs, executor) == []
    # the copy (zz_other/a) is not evaluated itself: its original is, once, and the file is shared
    assert sorted(executor.started) == ["runs/toy/a/seed_0", "runs/toy/b/seed_0"]
    copied = json.loads((project / "runs/zz_other/a/seed_0" / store.EVAL_FILE).read_text())
    assert copied == [{"run": "runs/toy/a/seed_0"}]
    executor.started.clear()
    assert cli.evaluate(runs, executor) == [] and executor.started == []  # nothing left to do


def test_a_failed_evaluation_is_reported_with_its_log(project):
    assert cli.main(["--seeds", "1", "--ablation", "toy"]) == 0
    runs = plan.plan_runs(cells.load_ablation("toy"), [0], Path("runs"))
    # the real command on a fake run (no checkpoint): it must fail, and say where to look
    for fork in (False, True):  # a fresh interpreter, and a child forked from this one (the default)
        failures = cli.evaluate(runs[:1], Local(1, fork), quick=True)
        assert len(failures) == 1 and str(failures[0]).startswith("eval of toy/a seed 0: exit ")
        assert str(failures[0]).endswith("runs/toy/a/seed_0/eval.log")
        assert "no checkpoint" in (project / "runs/toy/a/seed_0" / store.EVAL_LOG).read_text()
        assert not (project / "runs/toy/a/seed_0" / store.EVAL_FILE).exists()
