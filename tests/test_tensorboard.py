"""The ablation's TensorBoard page, read back through TensorBoard's own HTTP data API: the quick `losses`
ablation for real (one runner invocation for the module), then `tensorboard` on a free local port."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lightning_clip.report import factors as F
from lightning_clip.report import tensorboard as T
from lightning_clip.report.stats import t_interval

REPO = Path(__file__).resolve().parents[1]
CELLS = ("infonce", "siglip")  # the quick cells of `losses`
FACTORS = ["model.loss", "model.loss_args.init_bias"]  # what those cells' YAML deltas set


# -- the pieces, without a server ------------------------------------------------------------------------
def test_aggregate_is_the_tables_t_interval_at_every_step():
    seeds = [(np.array([2, 4, 6]), np.array([0.1, 0.2, 0.3])), (np.array([2, 4, 6]), np.array([0.2, 0.4, 0.5])),
             (np.array([2, 4]), np.array([0.3, 0.3]))]  # the third seed lacks step 6
    rows = T.aggregate(seeds)
    assert [r[0] for r in rows] == [2, 4, 6]
    for (step, mean, low, high), vals in zip(rows, ([0.1, 0.2, 0.3], [0.2, 0.4, 0.3], [0.3, 0.5])):
        iv = t_interval(vals)
        assert (mean, low, high) == pytest.approx((iv.mean, iv.low, iv.high))
        assert low < mean < high
    # one seed: no interval, so lower = upper = mean (no NaN in the event files)
    assert T.aggregate([(np.array([1, 3]), np.array([0.5, 0.7]))]) == [(1, 0.5, 0.5, 0.5), (3, 0.7, 0.7, 0.7)]


def test_rsum_is_the_sum_of_the_six_recalls_where_all_were_logged():
    s = {t: (np.array([5, 11]), np.array([0.1, 0.2])) for t in T.RECALLS}
    s["val/t2i/R@10"] = (np.array([11]), np.array([0.9]))
    out = T.with_rsum(s)
    assert out[T.RSUM][0].tolist() == [11] and out[T.RSUM][1] == pytest.approx([0.2 * 5 + 0.9])
    assert T.RSUM not in T.with_rsum({"val/t2i/R@1": s["val/t2i/R@1"]})


def test_factors_are_the_cells_keys_with_one_type_each(tmp_path):
    cells = {"a": {"model": {"loss": "siglip", "loss_args": {"init_bias": "prior"}}},
             "b": {"model": {"loss": "siglip", "loss_args": {"init_bias": -10.0}}, "data": {"batch_size": 16}},
             "c": {"model": {"loss": "infonce", "loss_args": {}}, "trainer": {"max_steps": 400}}}
    for name, delta in cells.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps(delta))
    manifest = {"cells": [{"name": n, "config": str(tmp_path / f"{n}.yaml")} for n in cells]}
    keys = F.factor_keys(manifest, tmp_path)
    assert keys == ["model.loss", "model.loss_args.init_bias", "data.batch_size", "trainer.max_steps"]
    configs = {n: {**F.flatten({"data": {"batch_size": 64}, "trainer": {"max_steps": 2000}}), **F.flatten(d)}
               for n, d in cells.items()}
    values = F.session_values(keys, configs)
    assert values["a"]["model.loss_args.init_bias"] == "prior" and values["b"]["model.loss_args.init_bias"] == "-10"
    assert "model.loss_args.init_bias" not in values["c"]  # the loss' own default: an empty cell in the tab
    assert values["a"]["data.batch_size"] == 64.0 and values["b"]["data.batch_size"] == 16.0
    assert values["c"]["trainer.max_steps"] == 400.0 and values["a"]["trainer.max_steps"] == 2000.0
    # cell files that cannot be found: the keys whose values differ between the runs' config.yaml
    for name, delta in cells.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(json.dumps({**delta, "run_dir": name, "seed_everything": 0}))
    lost = {"cells": [{"name": n, "config": "gone.yaml"} for n in cells]}
    assert F.factor_keys(lost, tmp_path / "x", [tmp_path / n for n in cells]) == [
        "data.batch_size", "model.loss", "model.loss_args.init_bias", "trainer.max_steps"]


def test_chart_tags_group_the_questions():
    tags = ["train/loss", "train/loss/positive", "val/t2i/R@1", T.RSUM, "temperature/scale", "temperature/bias",
            "temperature/log_scale",
            "variance/text/mean", "variance/text/R@1_decile_3", "train/false_negatives", "eval/x", "data/skipped"]
    got = dict(T.chart_tags(tags))
    assert list(got) == [q for q, _ in T.QUESTIONS]
    assert got["retrieval on validation"] == ["val/t2i/R@1", T.RSUM]
    assert got["training loss and each term"] == ["train/loss", "train/loss/positive"]
    assert got["temperature: scale and bias"] == ["temperature/bias", "temperature/scale"]
    assert got["variance heads"] == ["variance/text/mean"]


def test_the_run_logger_drops_epoch_and_a_zero_counter(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_clip.cli import RunLogger

    logged = []
    monkeypatch.setattr(TensorBoardLogger, "log_metrics", lambda self, m, step=None: logged.append((dict(m), step)))
    logger = RunLogger(save_dir=str(tmp_path), name="r", version="", default_hp_metric=False)
    logger.log_metrics({"epoch": 0, "data/skipped": 0.0, "train/loss": 1.0}, 1)
    logger.log_metrics({"epoch": 0, "data/skipped": 0.0}, 2)
    logger.log_metrics({"epoch": 1, "data/skipped": 3.0}, 3)
    assert logged == [({"train/loss": 1.0}, 1), ({"data/skipped": 3.0}, 3)]


# -- the quick ablation through TensorBoard's HTTP API ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # no evaluation suite and no tuning stage: this page needs the runs' events, and the time is make test's
    # (the trials' sessions: test_trials_are_sessions_of_their_own)
    done = subprocess.run([sys.executable, "-m", "lightning_clip.ablate", "--quick", "--ablation", "losses", "--no-eval",
                           "--no-tune", "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "runs" / "quick" / "losses"


@pytest.fixture(scope="module")
def server(quick_runs):
    port = _free_port()
    binary = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen([str(binary), "--logdir", str(quick_runs), "--host", "127.0.0.1", "--port", str(port),
                             "--load_fast=false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    want = {f"{T.SUMMARY}/{c}" for c in CELLS} | {f"{c}/seed_0" for c in CELLS} | {T.SUMMARY}
    try:
        deadline, runs = time.time() + 90, []
        while time.time() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stderr.read()[-2000:]}"
            try:
                runs = _get(base, "/data/runs")
                # the run list fills before every file is read: wait for the layout and the sessions too
                if want <= set(runs) and _get(base, "/data/plugin/custom_scalars/layout") and \
                        len(_post(base, "/data/plugin/hparams/session_groups", _groups_request())["sessionGroups"]) \
                        == len(CELLS):
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the runs within 90 s (runs seen: {runs})")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(base: str, path: str, **params):
    from urllib.parse import urlencode

    url = base + path + (f"?{urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=20) as r:
        return json.loads(r.read())


def _post(base: str, path: str, body: dict):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def _groups_request() -> dict:
    return {"experimentName": "", "startIndex": 0, "sliceSize": 100, "aggregationType": "AGGREGATION_AVG",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": []}


def test_the_layout_compares_every_cell_per_question(server):
    layout = _get(server, "/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[0].startswith("losses: retrieval on validation"), titles
    assert any(t.startswith("losses: training loss") for t in titles)
    assert any(t.startswith("losses: temperature") for t in titles)  # siglip's scale and bias
    assert any(t.startswith("losses: false-negative share") for t in titles)
    # the dashboard shows a category's charts last first, so the layout holds them in reverse
    first = [ch["title"] for ch in reversed(layout["category"][0]["chart"])]
    assert first[:3] == ["val/t2i/R@1", "val/i2t/R@1", T.RSUM]
    margins = [ch["margin"]["series"][0] for cat in layout["category"] for ch in cat["chart"] if "margin" in ch]
    assert len(margins) >= 8
    for series in margins:
        tag = series["value"].rsplit("/", 1)[0]
        assert series == {"value": f"{tag}/mean", "lower": f"{tag}/lower", "upper": f"{tag}/upper"}
    # every summary run (one per cell) has the mean, lower and upper series of every chart's tag, at the
    # same steps; with one seed (QUICK) the band is the mean itself
    training_tags = {s["value"].rsplit("/", 1)[0] for s in margins}
    for cell in CELLS:
        for tag in ("val/t2i/R@1", "val/i2t/R@1", T.RSUM, "train/loss"):
            got = _get(server, "/data/plugin/custom_scalars/scalars", run=f"{T.SUMMARY}/{cell}",
                       tag=f"^{re.escape(tag)}/(mean|lower|upper)$")
            assert got["regex_valid"]
            series = got["tag_to_events"]
            assert set(series) == {f"{tag}/mean", f"{tag}/lower", f"{tag}/upper"}, (cell, tag, list(series))
            steps = [[e[1] for e in series[f"{tag}/{k}"]] for k in ("mean", "lower", "upper")]
            assert steps[0] and steps[0] == steps[1] == steps[2]
            assert [e[2] for e in series[f"{tag}/lower"]] == [e[2] for e in series[f"{tag}/mean"]] \
                == [e[2] for e in series[f"{tag}/upper"]]
        assert "temperature/scale" in training_tags
    # the mean of one seed is that seed's own curve, read from its run
    seed = _get(server, "/data/plugin/scalars/scalars", run="siglip/seed_0", tag="val/t2i/R@1")
    mean = _get(server, "/data/plugin/scalars/scalars", run=f"{T.SUMMARY}/siglip", tag="val/t2i/R@1/mean")
    assert [(e[1], e[2]) for e in seed] == [(e[1], pytest.approx(e[2])) for e in mean]


def test_hparams_are_the_ablations_factors_and_the_headline_metrics(server):
    exp = _post(server, "/data/plugin/hparams/experiment", {"experimentName": ""})
    assert [h["name"] for h in exp["hparamInfos"]] == FACTORS
    assert [m["name"]["tag"] for m in exp["metricInfos"]] == [t for t, _ in T.HEADLINE]
    groups = _post(server, "/data/plugin/hparams/session_groups", _groups_request())["sessionGroups"]
    # one group per cell (its seeds), each session one seed run, none of the runs' own 25-argument sessions
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == set(CELLS)
    assert by_name["siglip"]["hparams"] == {"model.loss": "siglip", "model.loss_args.init_bias": "prior"}
    assert by_name["infonce"]["hparams"] == {"model.loss": "infonce"}
    for cell in CELLS:
        assert [s["name"] for s in by_name[cell]["sessions"]] == [f"{cell}/seed_0"]
        metrics = {m["name"]["tag"]: m["value"] for m in by_name[cell]["metricValues"]}
        assert {"val/t2i/R@1", "val/i2t/R@1", T.RSUM, "val/semantic/t2i/R@1"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())


def test_idle_cards_are_gone_from_the_runs_but_kept_in_final_metrics(server, quick_runs):
    tags = _get(server, "/data/plugin/scalars/tags")
    for cell in CELLS:
        run = tags[f"{cell}/seed_0"]
        assert "epoch" not in run and "data/skipped" not in run
        assert "val/t2i/R@1" in run and "train/loss" in run
        final = json.loads((quick_runs / cell / "seed_0" / "final_metrics.json").read_text())
        assert final["data/skipped"] == 0 and "epoch" in final


def test_runs_of_the_runner_leave_their_hparams_session_to_the_report():
    from lightning_clip.callbacks.results import HPARAMS_ENV
    from lightning_clip.grid.executors import worker_env

    assert worker_env(1)[HPARAMS_ENV] == worker_env(2)[HPARAMS_ENV] == "report"


def test_trials_are_sessions_of_their_own(tmp_path):
    """A tuning trial (runs/<ablation>/_tuning/<cell>/trial_<n>/) gets a session in its own group, with the
    tuned keys of its trial.yaml as columns beside the cells' factors."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from lightning_clip.report.load import load_runs

    root = tmp_path / "abl"
    (root / "c" / "seed_0").mkdir(parents=True)
    trial = root / T.TUNING / "c" / "trial_003"
    trial.mkdir(parents=True)
    (root / "c.yaml").write_text("model:\n  loss: infonce\n")
    for d, lr in ((root / "c" / "seed_0", 0.001), (trial, 0.004)):
        (d / "final_metrics.json").write_text("{}")
        (d / "config.yaml").write_text(f"model:\n  loss: infonce\n  lr: {lr}\n")
    (trial / "trial.yaml").write_text("model:\n  lr: 0.004\n")
    manifest = {"cells": [{"name": "c", "config": str(root / "c.yaml")}]}
    T.write_tensorboard("abl", root, manifest, load_runs(root, ["c"]))

    def session(d):
        acc = EventAccumulator(str(d))
        acc.Reload()
        return metadata.parse_session_start_info_plugin_data(
            acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])

    seed, tried = session(root / "c" / "seed_0"), session(trial)
    assert seed.group_name == "c" and tried.group_name == "c/trial_003"
    assert tried.hparams["model.lr"].number_value == 0.004 and seed.hparams["model.lr"].number_value == 0.001
    assert tried.hparams["model.loss"].string_value == "infonce"


def test_a_run_with_its_own_session_is_named(tmp_path):
    """TensorBoard shows the first session a run holds: a run that wrote its own (started outside the runner)
    hides the report's, and the report says so."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    from lightning_clip.report.load import load_runs

    run = tmp_path / "abl" / "c" / "seed_0"
    run.mkdir(parents=True)
    (run / "final_metrics.json").write_text("{}")
    with SummaryWriter(str(run)) as w:
        for summary in hparams({"loss": "infonce", "lr": 0.001}, {"val/t2i/R@1": 0.0}):
            w.file_writer.add_summary(summary)
        w.add_scalar("val/t2i/R@1", 0.5, 10)
    manifest = {"cells": [{"name": "c", "config": "gone.yaml"}]}
    with pytest.warns(UserWarning, match="1 run.*HPARAMS session of their own"):
        T.write_tensorboard("abl", tmp_path / "abl", manifest, load_runs(tmp_path / "abl", ["c"]))
