"""The confirm stage's statistics and table: Holm's adjustment, the equivalence test, the verdicts, the
rankings, on hand-made test-split evaluations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lightning_clip import report
from lightning_clip.report import confirm
from lightning_clip.report import stats as S


def test_holm_against_a_hand_computation():
    adjusted = S.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06) and math.isnan(adjusted["d"])
    assert S.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_paired_p_and_tost_against_scipy():
    base = {s: 30.0 + s for s in range(5)}
    cell = {s: base[s] + d for s, d in enumerate([0.2, -0.1, 0.1, 0.0, 0.15])}
    d = np.array([cell[s] - base[s] for s in range(5)])
    assert S.paired_p(cell, base) == pytest.approx(stats.ttest_rel(list(cell.values()), list(base.values())).pvalue)
    lower = stats.ttest_1samp(d, -1.5, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 1.5, alternative="less").pvalue
    assert S.tost(cell, base, 1.5) == pytest.approx(max(lower, upper)) and S.tost(cell, base, 1.5) < 0.001
    far = {s: base[s] + 3.0 + 0.1 * s for s in range(5)}
    assert S.tost(far, base, 1.5) > 0.5 and S.paired_p(far, base) < 0.01
    assert math.isnan(S.tost({0: 1.0}, {0: 2.0}, 1.5)) and math.isnan(S.paired_p({0: 1.0}, {0: 2.0}))


def _runs(root: Path, ablation: str, values: dict[str, list[float]], baseline: str = "base") -> None:
    folder = root / ablation
    folder.mkdir(parents=True)
    (folder / "ablation.json").write_text(json.dumps(
        {"ablation": ablation, "baseline": baseline, "seeds": [0, 1, 2, 3, 4],
         "cells": [{"name": c, "description": c} for c in values]}))
    for cell, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            run = folder / cell / f"seed_{seed}"
            run.mkdir(parents=True)
            m = {f"{d}_retrieval_recall@{k}": v / 100 * k / 2 for d in ("image", "text") for k in (1, 5, 10)}
            m.update({"image_retrieval_recall@1": v / 100, "semantic_t2i_R@1": 0.5, "ceiling_t2i_R@1": 0.37,
                      "ceiling_i2t_R@1": 0.88, "bayes_t2i_R@1": 0.46, "bayes_i2t_R@1": 0.89})
            (run / confirm.TEST_FILE).write_text(json.dumps([{"task": "zeroshot_retrieval", "metrics": m}]))


def test_confirm_table_verdicts_rankings_and_ceilings(tmp_path):
    noise = [0.3, -0.2, 0.1, -0.3, 0.1]
    base = [30 + n for n in noise]
    tuned = {"base": base,
             "better": [b + 5 + 0.05 * i for i, b in enumerate(base)],   # clearly above
             "same": [b + d for b, d in zip(base, [0.1, -0.1, 0.05, 0.0, -0.05])],  # within +-1.5
             "noisy": [b + d for b, d in zip(base, [6, -6, 5, -5, 1])]}  # no verdict possible
    default = {"base": [28.0, 28.5, 27.5, 28.2], "better": [29.0, 29.5, 28.5, 29.1],
               "same": [31.0, 31.2, 30.8, 31.1], "noisy": [20.0, 21.0, 22.0, 21.5]}
    _runs(tmp_path, "toy", default)
    _runs(tmp_path, "toy_tuned", tuned)
    written = report.write_confirm("toy", runs_dir=tmp_path, results_dir=tmp_path / "results", margin=1.5)
    rows = {r["cell"]: r for r in confirm.compare(confirm.load_test(tmp_path / "toy", tuned),
                                                  confirm.load_test(tmp_path / "toy_tuned", tuned), "base", 1.5)}
    assert rows["better"]["verdict"] == "above" and rows["same"]["verdict"] == "equivalent (±1.5)"
    assert rows["noisy"]["verdict"] == "undecided" and "verdict" not in rows["base"]
    # the tuning effect is tuned - default paired over the seeds both have (4 here)
    assert rows["base"]["tuning effect t2i R@1"].n == 4
    assert rows["base"]["tuning effect t2i R@1"].mean == pytest.approx(np.mean(base[:4]) - np.mean(default["base"]))
    # Bonferroni over the three comparisons: wider than a plain 95% interval of the same differences
    plain = S.paired_difference(dict(enumerate(tuned["better"])), dict(enumerate(base)))
    assert rows["better"]["vs baseline"].half_width > plain.half_width
    md = written["md"].read_text()
    assert "held-out test split" in md and "Bayes ceiling t2i 46.0, i2t 89.0" in md and "oracle ceiling t2i 37.0" in md
    assert "Holm" in md and "±1.5" in md and "Kendall's τ" in md
    # the ranking by default means (same > better > base > noisy) against the tuned one (better first)
    tau, _ = S.kendall({c: np.mean(v) for c, v in default.items()}, {c: np.mean(v) for c, v in tuned.items()})
    assert f"{tau:.2f} over 4 cells" in md
    assert "`better`" in md.split("leading group (")[1].split(")")[0]


def test_confirm_needs_the_tuned_baseline(tmp_path):
    _runs(tmp_path, "toy", {"base": [1.0, 2.0]})
    _runs(tmp_path, "toy_tuned", {"other": [1.0, 2.0]}, baseline="base")
    with pytest.raises(FileNotFoundError, match="tuned baseline"):
        report.write_confirm("toy", runs_dir=tmp_path, results_dir=tmp_path / "results")


def test_load_test_reads_seed_folders_only_and_names_a_damaged_record(tmp_path):
    _runs(tmp_path, "toy", {"base": [30.0, 31.0]})
    # a copy put aside next to seed 0 must not stand in for it (seed_0_old once parsed as seed 0)
    aside = tmp_path / "toy" / "base" / "seed_0_old"
    aside.mkdir()
    (aside / confirm.TEST_FILE).write_text(json.dumps(
        [{"task": "zeroshot_retrieval", "metrics": {"image_retrieval_recall@1": 0.99}}]))
    runs = confirm.load_test(tmp_path / "toy", ["base"])
    assert sorted(runs["base"]) == [0, 1] and runs["base"][0]["image_retrieval_recall@1"] == pytest.approx(0.30)
    (tmp_path / "toy" / "base" / "seed_1" / confirm.TEST_FILE).write_text("[{")
    with pytest.raises(ValueError, match=r"seed_1/eval_test\.json: unreadable evaluation records"):
        confirm.load_test(tmp_path / "toy", ["base"])
