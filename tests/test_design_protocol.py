"""Design ablations on the fair protocol: `# @from` (a cell starts from another ablation's tuned setting,
its own keys winning), `confirm:` without `tune:` (5 seeds, the test-split table) and the interaction
table of a series grid (a paired difference of differences), on hand-made runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from lightning_clip.grid import cells as C
from lightning_clip.grid import inherit
from lightning_clip.grid.plan import plan_runs
from lightning_clip.report import confirm, test_split


def _fake_fit(tmp_path: Path, order: Path) -> str:
    """A stand-in fit command that records the ablation of every run it starts and leaves a finished run."""
    fake = tmp_path / "fake_fit.py"
    fake.write_text("import json, sys, pathlib\n"
                    "run = pathlib.Path(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--run_dir=')))\n"
                    f"open({str(order)!r}, 'a').write(run.parent.parent.name + '\\n')\n"
                    "run.mkdir(parents=True, exist_ok=True)\n"
                    "(run / 'final_metrics.json').write_text(json.dumps({'step': 1}))\n")
    return f"{sys.executable} {fake}"


def _ablation(root: Path, name: str, cells: dict[str, str], settings: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for cell, text in cells.items():
        (folder / f"{cell}.yaml").write_text(text)
    if settings is not None:
        (folder / C.SETTINGS_FILE).write_text(yaml.safe_dump(settings))
    return folder


def _tuning(results: Path, source: str, chosen: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{source}_tuning.yaml").write_text(yaml.safe_dump(
        {c: {"study": c, "identity": "x", "trial": 3, "rsum": 200.0, "setting": s} for c, s in chosen.items()}))


def test_from_layers_the_tuned_setting_minus_the_cells_own_keys(tmp_path):
    _ablation(tmp_path / "abl", "negatives", {
        "softmax-k5": "# k = 5\n# @baseline\n# @from losses/infonce\nmodel:\n  loss: sampled_infonce\n"
                      "  loss_args: {num_negatives: 5, replacement: false}\n",
        "plain": "# no directive\nmodel:\n  loss: infonce\n"})
    _tuning(tmp_path / "results", "losses", {"infonce": {"model.lr": 0.003, "model.loss_args.init_scale": 12.0,
                                                         "model.loss_args.num_negatives": 9}})
    a = C.load_ablation("negatives", tmp_path / "abl")
    assert a.baseline.start_from == ("losses", "infonce")
    resolved = inherit.resolve(a, tmp_path / "runs", tmp_path / "results", log=lambda m: None)
    cell = next(c for c in resolved.cells if c.name == "softmax-k5")
    layer = yaml.safe_load(cell.overlay.read_text())
    # the tuned lr and init_scale come in; the cell's own num_negatives wins, its other loss_args are kept
    assert layer == {"model": {"lr": 0.003, "loss_args": {"num_negatives": 5, "replacement": False,
                                                          "init_scale": 12.0}}}
    assert next(c for c in resolved.cells if c.name == "plain").overlay is None
    runs = plan_runs(resolved, [0], tmp_path / "runs")
    args = next(r.args for r in runs if r.cell.name == "softmax-k5")
    configs = [args[i + 1] for i, x in enumerate(args) if x == "--config"]
    assert configs[-1] == str(cell.overlay) and configs[1].endswith("softmax-k5.yaml")
    # another tuned value is another run (the fingerprint reads the layer)
    before = {r.cell.name: r.fingerprint for r in runs}
    _tuning(tmp_path / "results", "losses", {"infonce": {"model.lr": 0.002}})
    again = plan_runs(inherit.resolve(a, tmp_path / "runs", tmp_path / "results", log=lambda m: None), [0], tmp_path / "runs")
    after = {r.cell.name: r.fingerprint for r in again}
    assert after["softmax-k5"] != before["softmax-k5"] and after["plain"] == before["plain"]


def test_from_without_a_chosen_setting_skips_the_cell_or_the_ablation(tmp_path):
    _ablation(tmp_path / "abl", "d", {
        "a": "# a\n# @baseline\nmodel:\n  loss: infonce\n",
        "b": "# b\n# @from losses/siglip\nmodel:\n  loss: siglip\n"})
    _tuning(tmp_path / "results", "losses", {"infonce": {"model.lr": 0.003}})
    said = []
    resolved = inherit.resolve(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", tmp_path / "results",
                               log=said.append)
    assert [c.name for c in resolved.cells] == ["a"]
    assert "d/b" in said[0] and "losses_tuning.yaml" in said[0] and "siglip" in said[0]
    _ablation(tmp_path / "abl", "e", {"a": "# a\n# @baseline\n# @from nowhere/x\nmodel:\n  loss: infonce\n"})
    said.clear()
    assert inherit.resolve(C.load_ablation("e", tmp_path / "abl"), tmp_path / "runs", tmp_path / "results",
                           log=said.append) is None
    assert any("baseline" in m for m in said)


def test_quick_reads_the_committed_tuning_file_when_the_quick_one_lacks_the_cell(tmp_path):
    _ablation(tmp_path / "abl", "d", {"a": "# a\n# @baseline\n# @from losses/infonce\nmodel:\n  loss: infonce\n"})
    _tuning(tmp_path / "results", "losses", {"infonce": {"model.lr": 0.004}})
    resolved = inherit.resolve(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", tmp_path / "results" / "quick",
                               quick=True, log=lambda m: None)
    assert yaml.safe_load(resolved.baseline.overlay.read_text()) == {"model": {"lr": 0.004}}
    # with no chosen setting anywhere, a quick run still runs the cell (as written), where a full one skips it
    (tmp_path / "results" / "losses_tuning.yaml").unlink()
    said = []
    quick = inherit.resolve(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", tmp_path / "results" / "quick",
                            quick=True, log=said.append)
    assert quick.baseline.overlay is None and "runs without" in said[0]
    assert inherit.resolve(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", tmp_path / "results",
                           log=lambda m: None) is None


@pytest.mark.parametrize("line", ["# @from losses", "# @from losses/a/b", "# @from a/b c/d"])
def test_a_malformed_from_names_the_file(tmp_path, line):
    _ablation(tmp_path / "abl", "d", {"a": f"# a\n# @baseline\n{line}\nmodel:\n  loss: infonce\n"})
    with pytest.raises(SystemExit, match=r"a\.yaml: '# @from' takes one ABLATION/CELL"):
        C.load_ablation("d", tmp_path / "abl")


def test_confirm_without_tune_runs_five_seeds_per_cell(tmp_path):
    _ablation(tmp_path / "abl", "d", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n",
                                      "b": "# b\n# @seeds 7\nmodel:\n  loss: siglip\n"}, {"confirm": {"margin": 1.0}})
    a = C.load_ablation("d", tmp_path / "abl")
    assert a.on_test_split and a.seeds_per_cell == 5 and a.default_seeds == 7
    runs = plan_runs(a, C.seeds_for(a), tmp_path / "runs", per_cell_seeds=True)
    assert sorted((r.cell.name, r.seed) for r in runs) == sorted([("a", s) for s in range(5)] + [("b", s) for s in range(7)])
    assert C.seeds_for(a, quick=True) == [0]
    plain = C.load_ablation("d", tmp_path / "abl").__class__("p", a.cells)
    assert not plain.on_test_split and plain.seeds_per_cell == C.DEFAULT_SEEDS
    _ablation(tmp_path / "abl", "bad", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n"}, {"confirm": {"seeds": 0}})
    with pytest.raises(SystemExit, match="confirm.seeds=0"):
        _ = C.load_ablation("bad", tmp_path / "abl").seeds_per_cell


def test_the_report_cli_keeps_a_design_ablations_test_table(tmp_path):
    # the runner records the test-split protocol in the manifest; `python -m lightning_clip.report` then
    # writes the validation table as <name>_val and the test table as <name>, never one over the other
    from lightning_clip.grid import store
    from lightning_clip.report.cli import main

    _ablation(tmp_path / "abl", "d", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n",
                                      "b": "# b\nmodel:\n  loss: siglip\n"}, {"confirm": {"margin": 1.0}})
    store.write_manifest(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", range(5), test_margin=1.0)
    manifest = json.loads((tmp_path / "runs" / "d" / "ablation.json").read_text())
    assert manifest["test_split"] == {"margin": 1.0}
    values = {"a": [30, 31, 29, 30, 30], "b": [30.3, 30.8, 29.1, 29.9, 30.0]}
    for cell, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            run = tmp_path / "runs" / "d" / cell / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "final_metrics.json").write_text(json.dumps({"val/t2i/R@1": (v - 2) / 100, "step": 10}))
            m = {f"{d}_retrieval_recall@{k}": 0.1 for d in ("image", "text") for k in (1, 5, 10)}
            m.update({"image_retrieval_recall@1": v / 100, "semantic_t2i_R@1": 0.5})
            (run / confirm.TEST_FILE).write_text(json.dumps([{"task": "zeroshot_retrieval", "metrics": m}]))
    results = tmp_path / "results"
    assert main(["--ablation", "d", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(results),
                 "--no-plots"]) == 0
    test_md, val_md = (results / "d.md").read_text(), (results / "d_val.md").read_text()
    assert "on the held-out test split" in test_md and "| equivalent (±1) |" in test_md   # b within ±1 of a: the manifest's margin
    assert "validation split" in val_md and "held-out test split" not in val_md
    # a manifest without the entry (any other ablation): the one table, under the ablation's name
    store.write_manifest(C.load_ablation("d", tmp_path / "abl"), tmp_path / "runs", range(5))
    assert main(["--ablation", "d", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(results),
                 "--no-plots"]) == 0
    assert "validation split" in (results / "d.md").read_text()


def test_a_tuned_ablations_default_grid_runs_the_confirm_seeds(tmp_path):
    # the default-recipe column of the confirm table pairs with the tuned one seed for seed
    _ablation(tmp_path / "abl", "t", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n"},
              {"tune": {"trials": 2}, "confirm": {"seeds": 4}})
    a = C.load_ablation("t", tmp_path / "abl")
    assert not a.on_test_split and a.seeds_per_cell == 4 and C.seeds_for(a) == [0, 1, 2, 3]
    _ablation(tmp_path / "abl", "u", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n"}, {"tune": {"trials": 2}})
    assert C.load_ablation("u", tmp_path / "abl").seeds_per_cell == C.DEFAULT_SEEDS


def _test_runs(root: Path, ablation: str, values: dict[str, list[float]], baseline: str) -> None:
    folder = root / ablation
    folder.mkdir(parents=True)
    (folder / "ablation.json").write_text(json.dumps(
        {"ablation": ablation, "baseline": baseline, "seeds": list(range(5)),
         "cells": [{"name": c, "description": c} for c in values]}))
    for cell, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            run = folder / cell / f"seed_{seed}"
            run.mkdir(parents=True)
            m = {f"{d}_retrieval_recall@{k}": 0.1 for d in ("image", "text") for k in (1, 5, 10)}
            m.update({"image_retrieval_recall@1": v / 100, "semantic_t2i_R@1": 0.5, "bayes_t2i_R@1": 0.46,
                      "bayes_i2t_R@1": 0.89})
            (run / confirm.TEST_FILE).write_text(json.dumps([{"task": "zeroshot_retrieval", "metrics": m}]))


def test_the_interaction_is_a_paired_difference_of_differences(tmp_path):
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 2, 5)                   # shared by every cell of a seed: pairing removes it
    cells = {}
    for series, gap in (("infonce", {16: 0.0, 64: 0.0}), ("siglip", {16: -1.0, 64: -5.0}), ("gcl", {16: 0.0, 64: 0.0})):
        for b in (16, 64):
            cells[f"{series}-b{b}"] = list(30 + gap[b] + seed_effect + rng.normal(0, 0.2, 5))
    _test_runs(tmp_path / "runs", "batch_size", cells, baseline="infonce-b64")
    written = test_split.write_test("batch_size", tmp_path / "runs", tmp_path / "results", margin=1.5)
    md = written["md"].read_text()
    rows = {(r["series"], r["x"]): r for r in test_split.interactions(
        confirm.load_test(tmp_path / "runs" / "batch_size", list(cells)), "infonce-b64", 1.5)}
    assert set(rows) == {("siglip", 16), ("gcl", 16)}
    # by hand: Δ per seed = (siglip16 - infonce16) - (siglip64 - infonce64)
    d = np.array([(cells["siglip-b16"][s] - cells["infonce-b16"][s]) - (cells["siglip-b64"][s] - cells["infonce-b64"][s])
                  for s in range(5)])
    r = rows[("siglip", 16)]
    assert r["delta"].mean == pytest.approx(d.mean()) and r["delta"].n == 5
    half = stats.t.ppf(1 - 0.05 / 2 / 2, 4) * d.std(ddof=1) / math.sqrt(5)   # Bonferroni over 2 interactions
    assert r["delta"].high - r["delta"].mean == pytest.approx(half)
    assert r["verdict"] == "larger" and rows[("gcl", 16)]["verdict"] == "equivalent (±1.5)"
    assert "## Interaction" in md and "| `siglip` | 16 |" in md and "Bayes ceiling t2i 46.0" in md
    assert "`infonce-b64` (baseline)" in md
    csv_text = written["csv"].read_text()
    assert "Δ siglip x=16" in csv_text and "delta mean" in csv_text


def test_each_series_is_compared_with_the_reference_at_the_same_x_on_plain_and_semantic_recall(tmp_path):
    # duplicates' question: oracle targets may lose plain recall and gain semantic recall at the same
    # false-negative share; the table states both
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 2, 5)
    plain = {("infonce", 1): 30, ("infonce", 24): 20, ("oracle", 1): 30, ("oracle", 24): 17}
    semantic = {("infonce", 1): 40, ("infonce", 24): 30, ("oracle", 1): 40, ("oracle", 24): 45}
    cells = {f"{s}-fn{x}": list(v + seed_effect + rng.normal(0, 0.2, 5)) for (s, x), v in plain.items()}
    _test_runs(tmp_path / "runs", "duplicates", cells, baseline="infonce-fn1")
    for (s, x), v in semantic.items():                   # a semantic recall of its own per cell and seed
        for seed in range(5):
            path = tmp_path / "runs" / "duplicates" / f"{s}-fn{x}" / f"seed_{seed}" / confirm.TEST_FILE
            records = json.loads(path.read_text())
            records[0]["metrics"]["semantic_t2i_R@1"] = (v + seed_effect[seed] + rng.normal(0, 0.2)) / 100
            path.write_text(json.dumps(records))
    runs = confirm.load_test(tmp_path / "runs" / "duplicates", list(cells))
    gaps = {r["x"]: r for r in test_split.gaps_at_each_x(runs, "infonce-fn1", 1.5)}
    assert set(gaps) == {1, 24} and all(r["series"] == "oracle" for r in gaps.values())
    sem = {c: confirm._values(runs[c], "semantic t2i R@1") for c in runs}
    d = np.array([sem["oracle-fn24"][k] - sem["infonce-fn24"][k] for k in range(5)])
    half = stats.t.ppf(1 - 0.05 / 2 / 2, 4) * d.std(ddof=1) / math.sqrt(5)   # Bonferroni over 2 per metric
    r = gaps[24]["semantic t2i R@1"]
    assert r.mean == pytest.approx(d.mean()) and r.high - r.mean == pytest.approx(half)
    assert gaps[24]["t2i R@1 verdict"] == "below" and gaps[24]["semantic t2i R@1 verdict"] == "above"
    assert gaps[1]["t2i R@1 verdict"] == "equivalent (±1.5)"
    written = test_split.write_test("duplicates", tmp_path / "runs", tmp_path / "results", margin=1.5)
    md = written["md"].read_text()
    row = next(line for line in md.split("## Each series against `infonce` at the same x")[1].splitlines()
               if line.startswith("| `oracle` | 24 |"))
    assert row.count("| below |") == 1 and row.rstrip().endswith("| above |")
    assert "oracle − infonce x=24" in written["csv"].read_text()


def test_declared_pairs_compare_two_cells_neither_of_which_is_the_baseline(tmp_path):
    # gcl_scale's question: a frozen scale against the learned one, both beside the InfoNCE baseline
    rng = np.random.default_rng(2)
    seed_effect = rng.normal(0, 2, 5)
    cells = {c: list(v + seed_effect + rng.normal(0, 0.3, 5))
             for c, v in (("infonce", 28.0), ("frozen", 27.0), ("learned", 22.0))}
    _test_runs(tmp_path / "runs", "g", cells, baseline="infonce")
    manifest = tmp_path / "runs" / "g" / "ablation.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "report": {"pairs": [["frozen", "learned"]]}}))
    written = test_split.write_test("g", tmp_path / "runs", tmp_path / "results", margin=1.5)
    md = written["md"].read_text()
    section = md.split("## Declared pairs (`report.pairs`)", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| `frozen` − `learned` |"))
    d = np.array(cells["frozen"]) - np.array(cells["learned"])
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)   # one pair: no Bonferroni factor
    assert f"{d.mean():.1f} [{d.mean() - half:.1f}, {d.mean() + half:.1f}] (5) | above |" in row
    assert "frozen − learned" in written["csv"].read_text()
    # a pair naming a cell without test evaluations names it and the manifest; a malformed one is refused
    manifest.write_text(json.dumps({**m, "report": {"pairs": [["frozen", "absent"]]}}))
    with pytest.raises(ValueError, match=r"ablation.json: report.pairs: no eval_test.json for cell 'absent'"):
        test_split.write_test("g", tmp_path / "runs", tmp_path / "results")
    for bad in (["frozen", "learned"], [["frozen"]], [["frozen", "frozen"]], "frozen learned"):
        manifest.write_text(json.dumps({**m, "report": {"pairs": bad}}))
        with pytest.raises(ValueError, match="report.pairs must be a list of"):
            test_split.write_test("g", tmp_path / "runs", tmp_path / "results")


def test_a_declared_pair_naming_no_cell_is_refused_before_anything_trains(tmp_path):
    cells = {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n", "b": "# b\nmodel:\n  loss: gcl\n",
             "c": "# c\nmodel:\n  loss: meru\n"}
    _ablation(tmp_path, "ok", cells, {"confirm": {"seeds": 5}, "report": {"pairs": [["b", "c"]]}})
    assert C.load_ablation("ok", tmp_path).report["pairs"] == [["b", "c"]]
    for i, bad in enumerate(([["b", "typo"]], [["b", "b"]], [["b"]], ["b", "c"])):
        _ablation(tmp_path, f"bad{i}", cells, {"report": {"pairs": bad}})
        with pytest.raises(SystemExit, match=rf"bad{i}/_ablation.yaml: 'report.pairs' lists \[cell, other cell\]"):
            C.load_ablation(f"bad{i}", tmp_path)


def test_a_verdict_never_contradicts_the_interval_printed_beside_it():
    from lightning_clip.report.stats import Interval, verdict

    # Holm's step-down rejects (p 0.02) where the Bonferroni interval still holds 0: no "above"
    assert verdict(Interval(4.2, -0.5, 8.8, 5), 0.02, 0.9, 1.5) == "undecided"
    assert verdict(Interval(4.2, 0.3, 8.1, 5), 0.02, 0.9, 1.5) == "above"
    assert verdict(Interval(-4.2, -8.1, -0.3, 5), 0.02, 0.9, 1.5, words=("larger", "smaller")) == "smaller"
    assert verdict(Interval(0.1, -0.9, 1.1, 5), 0.8, 0.01, 1.5) == "equivalent (±1.5)"
    assert verdict(Interval(4.2, 0.3, 8.1, 1), 0.02, 0.9, 1.5) == ""


def test_no_interaction_table_without_a_series_grid(tmp_path):
    _test_runs(tmp_path / "runs", "damsm", {"base": [30, 31, 29, 30, 30], "other": [32, 33, 31, 32, 33]}, "base")
    md = test_split.write_test("damsm", tmp_path / "runs", tmp_path / "results")["md"].read_text()
    assert "Interaction" not in md and "| `other` |" in md and "above" in md and "at the same x" not in md


def test_the_test_table_carries_the_variance_calibration_of_cells_with_log_std_heads(tmp_path):
    _test_runs(tmp_path / "runs", "variance", {"base": [30, 31, 29, 30, 30], "prob": [31, 30, 30, 29, 31]}, "base")
    ause = [0.10, 0.12, 0.11, 0.13, 0.09]
    for seed, a in enumerate(ause):                     # only `prob` has log-std heads
        path = tmp_path / "runs" / "variance" / "prob" / f"seed_{seed}" / confirm.TEST_FILE
        records = json.loads(path.read_text())
        records.append({"task": "variance_calibration",
                        "metrics": {"text_ause": a, "image_ause": 2 * a, "text_R@1_decile_1": 0.8,
                                    "text_R@1_decile_10": 0.02 * (seed + 1)}})
        path.write_text(json.dumps(records))
    written = test_split.write_test("variance", tmp_path / "runs", tmp_path / "results")
    md = written["md"].read_text()
    section = md.split("## Variance calibration on the test split", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith("| `prob` |")       # the cell without heads is not listed
    half = stats.t.ppf(0.975, 4) * np.std(ause, ddof=1) / math.sqrt(5)
    assert f"{np.mean(ause):.3f} [{np.mean(ause) - half:.3f}, {np.mean(ause) + half:.3f}] (5)" in rows[0]
    assert "| 80.0 [80.0, 80.0] (5) | 6.0 [" in rows[0]                # deciles in percent
    csv_text = written["csv"].read_text()
    assert "AUSE (text) mean" in csv_text and "t2i R@1 (least certain tenth) high" in csv_text
    # no record anywhere: no section
    _test_runs(tmp_path / "runs2", "damsm", {"base": [30, 31, 29, 30, 30], "other": [31, 30, 30, 29, 31]}, "base")
    assert "Variance calibration" not in test_split.write_test("damsm", tmp_path / "runs2", tmp_path / "r2")["md"].read_text()


def test_requires_pulls_in_the_required_ablation_first_and_refuses_a_circle(tmp_path):
    root = tmp_path / "abl"
    _ablation(root, "teacher", {"t": "# t\n# @baseline\nmodel:\n  loss: infonce\n"}, {"study": True})
    _ablation(root, "dup", {"s": "# s\n# @baseline\nmodel:\n  loss: soft_targets\n"}, {"requires": ["teacher"]})
    _ablation(root, "other", {"o": "# o\n# @baseline\nmodel:\n  loss: infonce\n"})
    got = C.with_requirements([C.load_ablation("other", root), C.load_ablation("dup", root)], root)
    assert [a.name for a in got] == ["other", "teacher", "dup"] and C.required_names(got) == {"teacher"}
    _ablation(root, "x", {"c": "# c\n# @baseline\nmodel:\n  loss: infonce\n"}, {"requires": ["y"]})
    _ablation(root, "y", {"c": "# c\n# @baseline\nmodel:\n  loss: infonce\n"}, {"requires": ["x"]})
    with pytest.raises(SystemExit, match="circle: x -> y -> x"):
        C.with_requirements([C.load_ablation("x", root)], root)
    _ablation(root, "self", {"c": "# c\n# @baseline\nmodel:\n  loss: infonce\n"}, {"requires": ["self"]})
    with pytest.raises(SystemExit, match="'requires' lists other ablations"):
        C.load_ablation("self", root)


def test_required_runs_train_before_the_rest(tmp_path):
    """Through the runner's CLI with a stand-in fit command that records the order runs start in."""
    import os

    from lightning_clip.grid import cli

    root = tmp_path / "abl"
    _ablation(root, "teacher", {"t": "# t\n# @baseline\n# @seeds 1\nmodel:\n  loss: infonce\ntrainer:\n  max_steps: 1\n"},
              {"study": True})
    _ablation(root, "dup", {f"s{i}": f"# s{i}\n{'# @baseline' if i == 0 else ''}\n# @seeds 1\nmodel:\n  loss: infonce\n"
                                        f"trainer:\n  max_steps: {100 + i}\n" for i in range(3)}, {"requires": ["teacher"]})
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 1\ndata:\n  batch_size: 64\n")
    order = tmp_path / "order.txt"
    rc = cli.main(["--ablation", "dup", "--ablations-dir", str(root), "--base", str(base), "--runs-dir",
                   str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), "--jobs", "2", "--no-report",
                   "--cmd", _fake_fit(tmp_path, order)])
    assert rc == 0
    assert order.read_text().split() == ["teacher", "dup", "dup", "dup"]
    assert os.path.isfile(tmp_path / "runs" / "teacher" / "t" / "seed_0" / "final_metrics.json")


def test_one_seed_cells_get_no_verdict(tmp_path):
    _test_runs(tmp_path / "runs", "quick", {"base": [30.0], "other": [31.0]}, "base")
    md = test_split.write_test("quick", tmp_path / "runs", tmp_path / "results")["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `other`"))
    assert row.endswith("| 1.0 (1) |  |") and "undecided" not in md


def test_a_run_reference_follows_the_runs_folder_and_the_referenced_runs_stamp(tmp_path):
    _ablation(tmp_path / "abl", "dup", {"s": "# s\n# @baseline\nmodel:\n  loss: soft_targets\n"
                                             "  teacher: \"{runs}/teacher/t/seed_0\"\n"})
    a = C.load_ablation("dup", tmp_path / "abl")
    for runs_dir in (tmp_path / "runs", tmp_path / "runs" / "quick"):
        run = plan_runs(a, [0], runs_dir)[0]
        assert f"--model.teacher={runs_dir / 'teacher/t/seed_0'}" in run.args
        assert run.args.index(f"--model.teacher={runs_dir / 'teacher/t/seed_0'}") < run.args.index(f"--run_dir={run.run_dir}")
    before = plan_runs(a, [0], tmp_path / "runs")[0].fingerprint
    teacher = tmp_path / "runs" / "teacher" / "t" / "seed_0"
    teacher.mkdir(parents=True)
    (teacher / "DONE").write_text(json.dumps({"fingerprint": "abc"}))
    first = plan_runs(a, [0], tmp_path / "runs")[0].fingerprint
    (teacher / "DONE").write_text(json.dumps({"fingerprint": "retrained"}))
    assert len({before, first, plan_runs(a, [0], tmp_path / "runs")[0].fingerprint}) == 3
    # the same plan in another runs folder is the same run (the folder is not part of the identity)
    assert plan_runs(a, [0], tmp_path / "elsewhere")[0].fingerprint == before


def test_from_cells_are_resolved_after_the_tune_stage_and_overlays_are_named_by_content(tmp_path):
    from lightning_clip.grid import cli

    root = tmp_path / "abl"
    _ablation(root, "plain", {"p": "# p\n# @baseline\n# @seeds 1\nmodel:\n  loss: infonce\n"})
    _ablation(root, "design", {"d": "# d\n# @baseline\n# @seeds 1\n# @from losses/infonce\nmodel:\n  loss: infonce\n"})
    results = tmp_path / "results"
    _tuning(results, "losses", {"infonce": {"model.lr": 0.003}})
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 1\n")
    order = tmp_path / "order.txt"
    argv = ["--ablation", "design", "plain", "--ablations-dir", str(root), "--base", str(base), "--runs-dir",
            str(tmp_path / "runs"), "--results-dir", str(results), "--no-report", "--cmd", _fake_fit(tmp_path, order)]
    assert cli.main(argv) == 0
    assert order.read_text().split() == ["plain", "design"]   # the design after everything it may read
    overlays = list((tmp_path / "runs" / "design" / inherit.FOLDER).glob("d-*.yaml"))
    assert len(overlays) == 1 and yaml.safe_load(overlays[0].read_text()) == {"model": {"lr": 0.003}}
    assert cli.main(argv) == 0 and order.read_text().split() == ["plain", "design"]   # nothing redone
    _tuning(results, "losses", {"infonce": {"model.lr": 0.002}})   # a new choice: a new file, the run redone
    assert cli.main(argv) == 0 and order.read_text().split() == ["plain", "design", "design"]
    assert len(list((tmp_path / "runs" / "design" / inherit.FOLDER).glob("d-*.yaml"))) == 2


def test_a_plain_runs_fingerprint_is_what_earlier_stamps_recorded(tmp_path):
    """The identity of a run without references is still {configs, seed, args}: stamps written before run
    references existed stay valid (a change here would redo every finished run)."""
    import hashlib

    from lightning_clip.grid.plan import canonical_config

    _ablation(tmp_path / "abl", "p", {"a": "# a\n# @baseline\nmodel:\n  loss: infonce\n"})
    a = C.load_ablation("p", tmp_path / "abl")
    run = plan_runs(a, [2], tmp_path / "runs", base=Path("experiments/base.yaml"))[0]
    identity = {"configs": [canonical_config(Path("experiments/base.yaml")), canonical_config(a.baseline.path)],
                "seed": 2, "args": []}
    assert run.fingerprint == hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def test_a_choice_tuned_for_other_configs_is_named(tmp_path):
    """The chosen setting is still used, with a message, when its study's identity is not the cell's now."""
    from lightning_clip.grid.tuning import TuneSettings, identity

    root = tmp_path / "abl"
    _ablation(root, "losses", {"infonce": "# i\n# @baseline\n# @tune model.loss_args.init_scale log 5 50\n"
                                          "model:\n  loss: infonce\n"}, {"tune": {"trials": 2}})
    _ablation(root, "d", {"a": "# a\n# @baseline\n# @from losses/infonce\nmodel:\n  loss: infonce\n"})
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 10\n")
    src = C.load_ablation("losses", root)
    current = identity(src, src.baseline, TuneSettings.of(src), [base, src.baseline.path], [])
    for ident, warned in ((current, False), ("older", True)):
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / "losses_tuning.yaml").write_text(yaml.safe_dump(
            {"infonce": {"study": "s", "identity": ident, "trial": 1, "rsum": 1.0, "setting": {"model.lr": 0.002}}}))
        said = []
        out = inherit.resolve(C.load_ablation("d", root), tmp_path / "runs", tmp_path / "results", log=said.append,
                              base=base, ablations_dir=root)
        assert out.baseline.overlay is not None
        assert any("tuned for other configs or budget" in m for m in said) == warned
