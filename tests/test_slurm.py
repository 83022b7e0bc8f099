"""`make ablate EXECUTOR=slurm` through submitit's local executor (the same submission path, no SLURM):
runs become jobs, complete ones are skipped, failures are reported with their log, tables are built."""
from __future__ import annotations

import pytest

pytest.importorskip("submitit")

from pathlib import Path  # noqa: E402

from lightning_clip.grid import cli, slurm, store  # noqa: E402
from test_grid import calls, cell, project, run_dirs  # noqa: E402,F401  (project is a fixture)


def _options(project, **kw):
    text = "cluster: local\ngpus_per_node: 0\ntime_min: 5\ncpus_per_task: 1\npoll_s: 0.2\n" + "".join(
        f"{k}: {v}\n" for k, v in kw.items())
    (project / "slurm.yaml").write_text(text)
    return ["--executor", "slurm", "--slurm-config", str(project / "slurm.yaml")]


def test_the_grid_runs_as_jobs_then_is_skipped(project, capsys):
    assert cli.main(["--seeds", "1", *_options(project)]) == 0
    assert run_dirs(project) == ["toy/a/seed_0", "toy/b/seed_0"]
    out = capsys.readouterr().out
    assert out.count("submit ") == 2 and "-> job " in out and "toy: wrote" in out
    for d in run_dirs(project):
        stamp = store.read_stamp(project / "runs" / d)
        assert stamp["job_id"] and (project / "runs" / d / store.JOB_FILE).is_file()
        assert (project / "runs" / d / "run.log").read_text().startswith("# ")  # the command, then its output
    assert (project / "results" / "toy.md").is_file()

    assert cli.main(["--seeds", "1", *_options(project)]) == 0
    assert "2 run(s) already complete" in capsys.readouterr().out and len(calls(project)) == 2


def test_a_failed_job_is_reported_with_its_log_and_the_others_run(project, capsys):
    cell(project, "toy", "b", "# the other loss\nmodel: {loss: siglip}\nfake: {fail: true}\n")
    assert cli.main(["--seeds", "1", "--no-report", *_options(project)]) == 1
    captured = capsys.readouterr()
    assert "FAILED toy/b seed 0 (exit 3, job " in captured.out and "loss is NaN at step 3" in captured.out
    assert "log runs/toy/b/seed_0/run.log" in captured.err
    assert run_dirs(project) == ["toy/a/seed_0"]


def test_options_file_is_checked_and_ddp_arguments_follow_the_resources(project):
    (project / "bad.yaml").write_text("gpus: 2\n")
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['gpus'\]; known: .*gpus_per_node"):
        slurm.load_options(project / "bad.yaml")
    with pytest.raises(SystemExit, match="needs its options file"):
        slurm.load_options(project / "absent.yaml")
    assert slurm.trainer_args({"gpus_per_node": 4, "nodes": 2}) == [
        "--trainer.accelerator=gpu", "--trainer.devices=4", "--trainer.num_nodes=2", "--trainer.strategy=ddp"]
    assert slurm.trainer_args({"gpus_per_node": 1, "nodes": 1}) == [
        "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.num_nodes=1"]
    assert slurm.trainer_args({"gpus_per_node": 0, "nodes": 1}) == []
    # the shipped options file parses and describes a SLURM job
    shipped = slurm.load_options(Path(__file__).resolve().parents[1] / "experiments/executors/slurm.yaml")
    assert shipped["cluster"] == "slurm" and shipped["gpus_per_node"] >= 1
