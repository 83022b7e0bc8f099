"""The tuning and confirm stages with a fake training command whose validation objective is a known
function of the learning rate: the same budget for every cell, pruning, the chosen setting, the confirm
runs at that setting, resume after kill -9; and the search-space declarations."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lightning_clip.grid import cells, cli, tuning
from lightning_clip.grid.cells import Param, parse_param
from test_grid import REPO, calls, cell  # noqa: F401

# Stands in for `python -m lightning_clip fit`: validates every --trainer.val_check_interval steps, each
# time rewriting final_metrics.json; recall grows with the step and peaks at lr = 1e-3 (log scale).
FAKE = textwrap.dedent("""\
    import json, math, os, sys, time
    import yaml
    args = sys.argv[1:]
    opt = lambda name: next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)
    cfg = {}
    for path in [args[i + 1] for i, a in enumerate(args) if a == "--config"]:
        for section, values in (yaml.safe_load(open(path)) or {}).items():
            cfg.setdefault(section, {}).update(values or {})
    run_dir = opt("run_dir")
    lr = float((cfg.get("model") or {}).get("lr", 1e-3))
    steps = int(opt("trainer.max_steps") or cfg["trainer"]["max_steps"])
    every = int(opt("trainer.val_check_interval") or steps)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"run_dir": run_dir, "pid": os.getpid(), "args": args, "lr": lr}) + "\\n")
    quality = max(0.0, 1 - abs(math.log10(lr) + 3) / 2)
    for step in range(every, steps + 1, every):
        r = quality * step / steps
        m = {f"val/{d}/R@{k}": min(1.0, r * k / 10) for d in ("t2i", "i2t") for k in (1, 5, 10)}
        m.update(step=step, loss_family="fake")
        tmp = os.path.join(run_dir, ".m.tmp")
        json.dump(m, open(tmp, "w"))
        os.replace(tmp, os.path.join(run_dir, "final_metrics.json"))
        time.sleep(float(cfg.get("fake", {}).get("sleep", 0.15)))
""")

SETTINGS = textwrap.dedent("""\
    tune:
      trials: 4
      seed: 1000
      validate_every: 2
      min_resource: 2
      reduction_factor: 3
      space: {model.lr: [log, 1.0e-5, 1.0e-1]}
    confirm: {seeds: 2}
""")


@pytest.fixture
def tuned_project(tmp_path, monkeypatch):
    (tmp_path / "experiments" / "ablations").mkdir(parents=True)
    (tmp_path / "experiments" / "base.yaml").write_text("trainer: {max_steps: 6}\nmodel: {lr: 0.001}\n")
    (tmp_path / "experiments" / "quick.yaml").write_text("trainer: {max_steps: 4}\n")
    cell(tmp_path, "toy", "a", "# the reference\n# @baseline\nmodel: {loss: infonce}\n")
    cell(tmp_path, "toy", "b", "# the other loss\n# @tune model.loss_args.init_scale log 5 50\n"
                               "model: {loss: siglip, loss_args: {init_bias: prior}}\n")
    (tmp_path / "experiments" / "ablations" / "toy" / "_ablation.yaml").write_text(SETTINGS)
    (tmp_path / "fake.py").write_text(FAKE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv(cli.CMD_ENV, f"{sys.executable} {tmp_path / 'fake.py'}")
    return tmp_path


def _studies(root: Path) -> dict[str, list]:
    storage = f"sqlite:///{root / 'runs/toy/_tuning/study.db'}"
    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        out[summary.study_name.split("/")[1]] = optuna.load_study(study_name=summary.study_name,
                                                                  storage=storage).get_trials()
    return out


# ------------------------------------------------------------------------------------------ the stage
def test_every_cell_gets_the_same_budget_and_the_best_complete_trial_is_chosen(tuned_project, capsys):
    assert cli.main(["--ablation", "toy", "--jobs", "2", "--no-report"]) == 0
    studies = _studies(tuned_project)
    assert set(studies) == {"a", "b"}
    S = optuna.trial.TrialState
    for name, trials in studies.items():
        states = [t.state for t in trials]
        assert states.count(S.COMPLETE) + states.count(S.PRUNED) == 4, (name, states)  # the same budget
        assert S.COMPLETE in states and S.FAIL not in states and S.RUNNING not in states
        for t in trials:  # every validation of a trial was reported at its step, pruned ones stop early
            steps = sorted(t.intermediate_values)
            assert steps and all(s % 2 == 0 for s in steps)
            assert (steps[-1] < 6) == (t.state == S.PRUNED)
    chosen = yaml.safe_load((tuned_project / "results" / "toy_tuning.yaml").read_text())
    for name, trials in studies.items():
        best = max((t for t in trials if t.state == S.COMPLETE), key=lambda t: t.value)
        assert chosen[name]["trial"] == best.number and chosen[name]["setting"] == best.params
    assert set(chosen["b"]["setting"]) == {"model.lr", "model.loss_args.init_scale"}  # shared space + the cell's
    # each trial's setting is a config layer that keeps what the cell sets in the same dict option
    trial_cfg = yaml.safe_load((tuned_project / f"runs/toy/_tuning/b/trial_{chosen['b']['trial']:03d}/trial.yaml").read_text())
    assert trial_cfg["model"]["loss_args"]["init_bias"] == "prior"
    assert trial_cfg["model"]["loss_args"]["init_scale"] == chosen["b"]["setting"]["model.loss_args.init_scale"]
    tuning_calls = [c for c in calls(tuned_project) if "/_tuning/" in c["run_dir"]]
    assert len(tuning_calls) == 8 and all("--seed_everything=1000" in c["args"] for c in tuning_calls)

    # the confirm stage: every cell at its chosen setting, confirm.seeds seeds, the tuned layer after the cell
    confirm = sorted(c["run_dir"] for c in calls(tuned_project) if c["run_dir"].startswith("runs/toy_tuned/"))
    assert confirm == [f"runs/toy_tuned/{c}/seed_{s}" for c in ("a", "b") for s in (0, 1)]
    for c in calls(tuned_project):
        if c["run_dir"].startswith("runs/toy_tuned/a/"):
            assert math.isclose(c["lr"], chosen["a"]["setting"]["model.lr"])
            assert "runs/toy_tuned/_overlays/a.yaml" in c["args"]

    # a second call redoes nothing
    before = len(calls(tuned_project))
    assert cli.main(["--ablation", "toy", "--jobs", "2", "--no-report"]) == 0
    assert len(calls(tuned_project)) == before
    assert "matches its configs and budget" in capsys.readouterr().out


@pytest.mark.slow
def test_a_changed_cell_is_tuned_again_and_no_tune_skips_both_stages(tuned_project):
    assert cli.main(["--ablation", "toy", "--no-report", "--stages", "tune"]) == 0  # the tuning stage alone
    assert (tuned_project / "runs/toy/_tuning/study.db").is_file() and not (tuned_project / "runs/toy/a").exists()
    assert not (tuned_project / "runs/toy_tuned").exists()
    with pytest.raises(SystemExit):
        cli.parse_args(["--stages", "tune,typo"])
    (tuned_project / "results/toy_tuning.yaml").unlink()
    for folder in ("runs", "calls.jsonl"):
        subprocess.run(["rm", "-rf", str(tuned_project / folder)], check=True)
    assert cli.main(["--ablation", "toy", "--no-report", "--no-tune"]) == 0
    assert not (tuned_project / "runs/toy/_tuning").exists() and not (tuned_project / "runs/toy_tuned").exists()
    assert cli.main(["--ablation", "toy", "--no-report"]) == 0
    first = yaml.safe_load((tuned_project / "results/toy_tuning.yaml").read_text())
    cell(tuned_project, "toy", "b", "# the other loss\n# @tune model.loss_args.init_scale log 5 60\n"
                                    "model: {loss: siglip, loss_args: {init_bias: prior}}\n")
    n = len(calls(tuned_project))
    assert cli.main(["--ablation", "toy", "--no-report"]) == 0
    again = yaml.safe_load((tuned_project / "results/toy_tuning.yaml").read_text())
    assert again["b"]["identity"] != first["b"]["identity"] and again["a"] == first["a"]
    assert len(calls(tuned_project)) > n


@pytest.mark.slow
def test_kill_9_during_tuning_then_resume_keeps_finished_trials(tuned_project):
    (tuned_project / "experiments" / "base.yaml").write_text("trainer: {max_steps: 6}\nmodel: {lr: 0.001}\n"
                                                              "fake: {sleep: 0.4}\n")
    runner = subprocess.Popen([sys.executable, "-m", "lightning_clip.ablate", "--ablation", "toy", "--no-report"],
                              cwd=tuned_project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum("/_tuning/" in c["run_dir"] for c in calls(tuned_project)) < 3:
        time.sleep(0.05)
    runner.send_signal(signal.SIGKILL)
    runner.wait(30)
    time.sleep(1.0)  # the trial it ran gets its parent-death signal
    before = {c["run_dir"] for c in calls(tuned_project) if "/_tuning/" in c["run_dir"]}
    assert len(before) >= 3

    assert cli.main(["--ablation", "toy", "--no-report"]) == 0
    S = optuna.trial.TrialState
    studies = _studies(tuned_project)
    assert [t.state for t in studies["a"]].count(S.FAIL) == 1  # the trial the dead runner left running
    for trials in studies.values():
        assert sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials) == 4
    md = (tuned_project / "results" / "toy_tuning.md").read_text()
    assert "Trials: 4 counted" in md and f"({tuning.INTERRUPTED})" in md
    runs = [c["run_dir"] for c in calls(tuned_project) if "/_tuning/" in c["run_dir"]]
    assert len(runs) == len(set(runs)), "a finished trial is never run again"


# ------------------------------------------------------------------------------------ declarations
def test_search_dimensions_parse_and_bad_ones_name_the_file():
    assert parse_param(["model.lr", "log", "1e-4", "1e-2"], "x") == Param("model.lr", "log", (1e-4, 1e-2))
    assert parse_param(["model.loss_args.vib_beta", "choice", "0.0", "0.001"], "x").args == (0.0, 0.001)
    for words, match in [(["model.lr", "log", "0", "1"], "LOW > 0"), (["model.lr", "normal", "0", "1"], "unknown kind"),
                         (["lr", "log", "1e-4", "1e-2"], "under model."), (["model.k", "int", "1.5", "3"], "integer"),
                         (["model.k", "choice", "1"], "at least two"), (["model.k", "float", "2", "1"], "LOW < HIGH")]:
        with pytest.raises(ValueError, match=match):
            parse_param(words, "cell.yaml")


def test_a_cells_own_dimension_overrides_the_shared_one(tuned_project):
    cell(tuned_project, "toy", "b", "# the other loss\n# @tune model.lr log 1e-3 1e-2\nmodel: {loss: siglip}\n")
    ablation = cells.load_ablation("toy")
    settings = tuning.TuneSettings.of(ablation)
    assert [p.describe() for p in settings.space_of(ablation.cells[1])] == ["model.lr log 0.001 0.01"]
    assert tuning.TuneSettings.of(ablation, quick=False).trials == 4
    (tuned_project / "experiments/ablations/toy/_ablation.yaml").write_text("tune: {trails: 4}\n")
    with pytest.raises(SystemExit, match="unknown keys \\['trails'\\]"):
        tuning.TuneSettings.of(cells.load_ablation("toy"))


def test_shipped_losses_ablation_declares_a_space_for_every_family():
    ablation = cells.load_ablation("losses", REPO / "experiments" / "ablations")
    settings = tuning.TuneSettings.of(ablation)
    assert ablation.confirm["seeds"] >= 5 and settings.trials >= 8
    for c in ablation.cells:
        keys = [p.key for p in settings.space_of(c)]
        assert keys[0] == "model.lr", c.name
        family = yaml.safe_load(c.path.read_text())["model"]["loss"]
        if family != "probabilistic" or "gaussian" in c.name:  # the proposal has no temperature knob
            assert len(keys) >= 2, f"{c.name}: its own knobs are tuned too"


def test_nested_layer_and_objective():
    layer = tuning.nested({"model.lr": 0.01, "model.loss_args.init_scale": 20.0},
                          {"model": {"loss": "siglip", "loss_args": {"init_bias": "prior"}}})
    assert layer == {"model": {"lr": 0.01, "loss_args": {"init_bias": "prior", "init_scale": 20.0}}}
    metrics = {f"val/{d}/R@{k}": 0.1 for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert tuning.objective(metrics) == pytest.approx(60.0)
    assert tuning.objective({"val/t2i/R@1": 0.5}) is None


def test_successive_halving_prunes_the_worse_of_two_trials_at_the_first_rung(tuned_project):
    ablation = cells.load_ablation("toy")
    study = tuning.CellStudy(ablation, ablation.cells[0], tuning.TuneSettings.of(ablation), Path("runs"),
                             ["python"], ["--config", "experiments/base.yaml"], "x")
    assert study.max_steps == 6  # base.yaml's
    jobs = [study.next(set()) for _ in range(2)]

    def validate(job, r, step):
        m = {f"val/{d}/R@{k}": r for d in ("t2i", "i2t") for k in (1, 5, 10)}
        (job.folder / "final_metrics.json").write_text(json.dumps({**m, "step": step}))

    for job, r in zip(jobs, (0.5, 0.1)):
        study.prepare(job)
        validate(job, r, 2)
    assert study.check(jobs[0]) is None
    assert study.check(jobs[1]).startswith("pruned at step 2")
    assert study.check(jobs[1]) is None  # a step is reported once
    # a trial's last validation is its result: it is told complete, never pruned there
    late = [study.next(set()) for _ in range(2)]
    for job, r in zip(late, (0.5, 0.01)):
        study.prepare(job)
        validate(job, r, 6)
        assert study.check(job) is None


def test_a_failed_trial_is_not_counted_and_the_report_says_why(tuned_project):
    from lightning_clip.report.tuning import format_tuning
    ablation = cells.load_ablation("toy")
    study = tuning.CellStudy(ablation, ablation.cells[0], tuning.TuneSettings.of(ablation), Path("runs"),
                             ["python"], ["--config", "experiments/base.yaml"], "x")
    budget = len(study)
    job = study.next(set())
    study.prepare(job)
    study.failed(job, "exit status 1: CUDA out of memory")
    assert len(study) == budget, "a failed trial is drawn again"
    summary = study.summary()
    assert [(t["state"], t["failure"]) for t in summary["trials"]] == [("fail", "exit status 1: CUDA out of memory")]
    md = format_tuning("toy", [summary], {"trials": budget, "space": []})
    assert "Trials: 0 counted (0 complete, 0 pruned); failed, not counted (a new trial was drawn in its place): " \
           "trial 0 (exit status 1: CUDA out of memory)." in md
