"""The ablation report: interval math against scipy, pairing by seed, marking, atomic writes, the notebook."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lightning_clip import files, report
from lightning_clip.report import budget, columns, plots, ranking, tables
from lightning_clip.report import stats as report_stats

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- fake runs
def write_events(run_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """TensorBoard scalars as Lightning's logger writes them (simple_value summaries)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(run_dir))
    for tag, points in scalars.items():
        for step, value in points:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
            writer.add_event(event_pb2.Event(step=step, wall_time=1.0 + step, summary=summary))
    writer.close()


def make_fake_ablation(runs_dir: Path, name: str = "losses", cells=("infonce", "siglip", "dcl"),
                       seeds=(0, 1, 2), events: bool = True) -> dict:
    """runs/<name>/<cell>/seed_<k> with final_metrics.json (and event files), plus the runner's manifest.
    siglip is clearly better than infonce on every seed; dcl equal up to noise; seeds shift all cells."""
    rng = np.random.default_rng(0)
    truth = {"infonce": 0.40, "siglip": 0.46, "dcl": 0.40}
    values = {}
    for seed in seeds:
        seed_shift = 0.05 * (seed - 1)  # what a seed does to every cell (data order, init)
        for cell in cells:
            r1 = truth.get(cell, 0.3) + seed_shift + rng.normal(0, 0.004)
            m = {"val/t2i/R@1": r1, "val/i2t/R@1": r1 + 0.02, "val/t2i/R@5": min(1.0, 2 * r1),
                 "train/loss": 2.0 - r1, "temperature/scale": 20.0 + seed, "step": 100, "epoch": 3,
                 "wall_time_s": 12.0, "loss_family": cell, "val/i2t/median_rank": 3.0}
            if cell == "siglip":
                m["temperature/bias"] = -9.5
            values[(cell, seed)] = m
            run = runs_dir / name / cell / f"seed_{seed}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "final_metrics.json").write_text(json.dumps(m))
            (run / "DONE").write_text("{}")
            if events:
                write_events(run, {"train/loss": [(s, 2.5 - r1 * s / 100) for s in range(0, 101, 10)],
                                   "val/t2i/R@1": [(50, r1 / 2), (100, r1)]})
    manifest = dict(ablation=name, baseline=cells[0], seeds=list(seeds),
                    cells=[dict(name=c, description=f"what {c} tests") for c in cells])
    (runs_dir / name / "ablation.json").write_text(json.dumps(manifest))
    return values


# ------------------------------------------------------------------------------------- statistics
def test_t_interval_matches_scipy():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 10):
        x = rng.normal(0.4, 0.05, n)
        iv = report_stats.t_interval(x)
        low, high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert iv.n == n and iv.mean == pytest.approx(x.mean())
        assert (iv.low, iv.high) == pytest.approx((low, high))
    # the textbook value for three seeds: t_{0.975, 2} = 4.3027
    iv = report_stats.t_interval([1.0, 2.0, 3.0])
    assert iv.half_width == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)


def test_t_interval_degenerate_cases():
    one = report_stats.t_interval([0.3])
    assert one.mean == 0.3 and one.n == 1 and math.isnan(one.low) and not one.excludes_zero
    assert report_stats.t_interval([]).n == 0
    assert report_stats.t_interval([0.2, float("nan"), 0.4]).n == 2  # a NaN metric is not a seed's value


def test_paired_difference_pairs_by_seed_and_drops_unpaired_seeds():
    base = {0: 0.30, 1: 0.40, 2: 0.50, 3: 0.9}
    cell = {0: 0.33, 1: 0.42, 2: 0.54, 4: 0.1}  # seed 3 only in the baseline, seed 4 only in the cell
    d = report_stats.paired_difference(cell, base)
    diffs = [0.03, 0.02, 0.04]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert d.n == 3 and d.mean == pytest.approx(0.03)
    assert (d.low, d.high) == pytest.approx((low, high))
    assert d.excludes_zero
    # unpaired, the two intervals overlap heavily: the seed effect hides the difference
    assert report_stats.t_interval(cell.values()).low < report_stats.t_interval([0.30, 0.40, 0.50]).high


def test_summary_rows_mark_and_blank(tmp_path):
    values = make_fake_ablation(tmp_path, events=False)
    metrics = report.metrics_of(report.load_runs(tmp_path / "losses"))
    assert set(metrics) == {"infonce", "siglip", "dcl"} and set(metrics["siglip"]) == {0, 1, 2}
    assert "loss_family" not in metrics["siglip"][0]  # strings are not metrics
    rows = {r["cell"]: r for r in report.summarize(metrics, "infonce")}
    key = "val/t2i/R@1"
    expected = report_stats.paired_difference({s: values[("siglip", s)][key] for s in range(3)},
                                        {s: values[("infonce", s)][key] for s in range(3)})
    assert rows["siglip"][f"{key} diff"] == pytest.approx(expected.mean)
    assert rows["siglip"][f"{key} diff_ci_low"] == pytest.approx(expected.low)
    assert rows["siglip"][f"{key} diff_sig"] == 1
    assert rows["dcl"][f"{key} diff_sig"] == 0
    assert f"{key} diff" not in rows["infonce"] and rows["infonce"]["baseline"] == 1
    assert "temperature/bias mean" in rows["siglip"] and "temperature/bias mean" not in rows["infonce"]

    md = report.format_markdown(list(rows.values()), "losses")
    main_table = md.split("## Difference")[0]
    table = {line.split("|")[1].strip(): line for line in main_table.splitlines() if line.startswith("| `")}
    diff_lines = [line for line in md.split("## Difference")[1].splitlines() if line.startswith("| `")]
    siglip_diff = next(line for line in diff_lines if "`siglip`" in line)
    dcl_diff = next(line for line in diff_lines if "`dcl`" in line)
    assert f"**+{100 * expected.mean:.1f} [{100 * expected.low:.1f}, {100 * expected.high:.1f}]**" in siglip_diff
    assert "**" not in dcl_diff
    assert "(baseline)" in table["`infonce` (baseline)"]
    assert "median_rank" not in md, "keys outside report.METRICS go to the CSV only"
    header = next(line for line in main_table.splitlines() if line.startswith("| cell | seeds"))
    bias_col = [h.strip() for h in header.split("|")].index("bias")
    assert table["`infonce` (baseline)"].split("|")[bias_col].strip() == ""  # not applicable: blank
    assert table["`siglip`"].split("|")[bias_col].strip().startswith("-9.50")


def test_series_ablation_compares_each_cell_with_the_baseline_series_at_the_same_number():
    key = "val/t2i/R@1"
    # siglip − infonce is +0.05 at b16 in every seed (tiny spread) and about 0 at b64 (noisy)
    metrics = {
        "infonce-b64": {s: {key: 0.30 + 0.01 * s} for s in range(3)},
        "infonce-b16": {s: {key: 0.20 + 0.02 * s} for s in range(3)},
        "siglip-b64": {s: {key: 0.30 + 0.01 * s + (0.02, -0.03, 0.01)[s]} for s in range(3)},
        "siglip-b16": {s: {key: 0.25 + 0.02 * s + 0.001 * s} for s in range(3)},
        "siglip-b32": {s: {key: 0.22} for s in range(3)},  # no infonce-b32: nothing to pair with
    }
    rows = {r["cell"]: r for r in tables.series_differences(metrics, "infonce-b64")}
    assert set(rows) == {"siglip-b16", "siglip-b64"}
    assert rows["siglip-b16"]["versus"] == "infonce-b16" and rows["siglip-b64"]["versus"] == "infonce-b64"
    expected = report_stats.paired_difference({s: metrics["siglip-b16"][s][key] for s in range(3)},
                                        {s: metrics["infonce-b16"][s][key] for s in range(3)})
    assert rows["siglip-b16"][f"{key} diff"] == pytest.approx(expected.mean)
    assert rows["siglip-b16"][f"{key} diff_sig"] == 1 and rows["siglip-b64"][f"{key} diff_sig"] == 0
    md = report.format_markdown(report.summarize(metrics, "infonce-b64"), "batch_size",
                                series=list(rows.values()))
    section = md.split("## Difference at the same setting")[1]
    line = next(x for x in section.splitlines() if x.startswith("| `siglip-b16`"))
    assert "`infonce-b16`" in line and f"**+{100 * expected.mean:.1f} [" in line
    assert tables.series_differences({"infonce": metrics["infonce-b64"], "dcl": metrics["siglip-b64"]},
                                     "infonce") == []  # not a series ablation


def test_csv_round_trip(tmp_path):
    make_fake_ablation(tmp_path, events=False)
    rows = report.summarize(report.metrics_of(report.load_runs(tmp_path / "losses")), "infonce")
    path = files.atomic_write(tmp_path / "t.csv", tables.to_csv(rows))
    back = report.read_csv(path)
    assert [r["cell"] for r in back] == [r["cell"] for r in rows]
    assert back[0]["val/i2t/median_rank mean"] == 3.0
    for got, want in zip(back, rows):
        assert got.keys() == {k for k, v in want.items() if not (isinstance(v, float) and math.isnan(v))}
        for k, v in want.items():
            if isinstance(v, float) and not math.isnan(v):
                assert got[k] == pytest.approx(v, rel=1e-12)


# ----------------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "results" / "losses.md"
    files.atomic_write(target, "old table\n")
    files.atomic_write(target, "new table\n")
    assert target.read_text() == "new table\n"

    def crash(src, dst):  # an interruption between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, "half a tab")
    assert target.read_text() == "new table\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["losses.md"]


def test_an_interrupted_report_leaves_the_previous_tables(tmp_path, monkeypatch):
    make_fake_ablation(tmp_path / "runs", events=False)
    written = report.write_report("losses", tmp_path / "runs", tmp_path / "results", plots=False)
    before = {kind: path.read_text() for kind, path in written.items()}
    (tmp_path / "runs" / "losses" / "dcl" / "seed_0" / "final_metrics.json").write_text(
        json.dumps({"val/t2i/R@1": 0.9, "step": 100}))

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        report.write_report("losses", tmp_path / "runs", tmp_path / "results", plots=False)
    assert {kind: path.read_text() for kind, path in written.items()} == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["losses.csv", "losses.md"]


# ----------------------------------------------------------------------------------- full report
def png_pixels(path: Path) -> np.ndarray:
    """The decoded RGB pixels of a PNG (PIL raises on a truncated or corrupt file)."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def has_color(pixels: np.ndarray, rgb: tuple[float, float, float]) -> bool:
    return bool(np.any(np.all(pixels == np.round(np.array(rgb) * 255).astype(np.uint8), axis=-1)))


def test_write_report_writes_tables_and_plots(tmp_path, monkeypatch):
    from matplotlib import colormaps

    make_fake_ablation(tmp_path / "runs")
    drawn = {}
    original = plots.plot_curves

    def spy(curves, **kw):  # the curves the report itself loaded and drew
        drawn.update(curves=curves, **kw)
        return original(curves, **kw)

    monkeypatch.setattr(plots, "plot_curves", spy)
    written = report.write_report("losses", tmp_path / "runs", tmp_path / "results")
    assert set(written) == {"csv", "md", "bars", "curves", "ranking"}
    curves = drawn["curves"]
    assert drawn["tags"] == report.CURVE_TAGS and drawn["baseline"] == "infonce"
    assert set(curves) == {"infonce", "siglip", "dcl"} and len(curves["siglip"]["val/t2i/R@1"]) == 3
    assert [len(s[0]) for s in curves["siglip"]["train/loss"]] == [11, 11, 11]
    steps, mean, std = report_stats.mean_band(curves["siglip"]["val/t2i/R@1"])
    assert list(steps) == [50, 100] and mean[1] == pytest.approx(0.46, abs=0.02) and std[1] > 0

    # the figures decode, have the size of their figure at 120 dpi, and show the cells' colours
    tab10 = colormaps["tab10"]
    curves_png, bars_png = png_pixels(written["curves"]), png_pixels(written["bars"])
    assert curves_png.shape == (round(4.2 * 120), 2 * 6 * 120, 3)  # two panels: R@1 and loss
    assert bars_png.shape == (round(4.6 * 120), 2 * 4.5 * 120, 3)  # t2i and i2t R@1, 4.5 in each
    for pixels in (curves_png, bars_png):
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "not a blank or uniform picture"
        assert has_color(pixels, (0.0, 0.0, 0.0)), "the baseline in black"
        assert has_color(pixels, tab10(0)[:3]) and has_color(pixels, tab10(1)[:3]), "siglip and dcl"
    assert not list((tmp_path / "results").glob("*.tmp")) and not list((tmp_path / "results").glob(".*"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.write_report("nowhere", tmp_path / "runs", tmp_path / "results")


def test_series_cells_are_grouped():
    mapping, label = columns.series_of(["infonce-b16", "siglip-b16", "infonce-b64", "siglip-b64"])
    assert mapping["siglip-b64"] == ("siglip", 64) and label == "batch size"
    assert columns.series_of(["infonce", "siglip"]) is None
    assert columns.series_of(["infonce-b16", "siglip-b16"]) is None  # one x value: plain bars


# ----------------------------------------------------------------------------------- the notebook
def execute_notebook(tmp_path, monkeypatch, runs, results, ablation="losses"):
    """Run notebooks/compare_losses.ipynb top to bottom on `runs`/`results`; returns its code outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a kernel spec for this interpreter, so the notebook runs in the environment under test
    spec = tmp_path / "jupyter" / "kernels" / "lightning-clip-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightning-clip test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("ABLATION", ablation)
    monkeypatch.setenv("LIGHTNING_CLIP_RUNS", str(runs))
    monkeypatch.setenv("LIGHTNING_CLIP_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    path = REPO / "notebooks" / "compare_losses.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, kernel_name="lightning-clip-test", timeout=120,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    make_fake_ablation(runs)
    report.write_report("losses", runs, results, plots=False)
    outputs = execute_notebook(tmp_path, monkeypatch, runs, results)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the bars and the curves are drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "siglip" in text and "best t2i R@1: siglip" in text


# ----------------------------------------------------------------------------- ceiling and FN share
def _rows_with(ceilings, fn=None):
    metrics = {}
    for cell, (t2i, i2t) in ceilings.items():
        metrics[cell] = {}
        for seed in (0, 1):
            m = {"val/t2i/R@1": 0.3 + 0.01 * seed, "val/ceiling/t2i/R@1": t2i, "val/ceiling/i2t/R@1": i2t}
            if fn is not None:
                m["train/false_negatives"] = fn + 0.01 * seed
            metrics[cell][seed] = m
    return report.summarize(metrics, next(iter(ceilings)))


def test_ceiling_is_one_line_when_uniform_and_a_column_when_cells_differ():
    md = report.format_markdown(_rows_with({"infonce": (0.4125, 0.55), "siglip": (0.4125, 0.55)}, fn=0.12), "x")
    assert ("Oracle ceiling (expected R@1 of a perfect scorer with random tie-breaking): t2i 41.2%, i2t 55.0%."
            in md)
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    assert "ceiling" not in header and "FN share" in header
    assert "| 12.5 ± 6.4 |" in md  # FN share in %: mean 0.125, half-width t(0.975,1) * 0.00707 = 0.0635
    md = report.format_markdown(_rows_with({"infonce-dup0": (0.41, 0.55), "infonce-dup50": (0.30, 0.52)}), "x")
    assert "Oracle ceiling" not in md
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    assert "ceiling t2i R@1" in header and "ceiling i2t R@1" in header and "FN share" not in header
    assert "| 30.0 ± 0.0 | 52.0 ± 0.0 |" in md  # per cell (two equal seeds: zero width)
    # no ceiling anywhere (real data): neither
    md = report.format_markdown(report.summarize({"a": {0: {"val/t2i/R@1": 0.2}}}, "a"), "x")
    assert "ceiling" not in md.lower()


# ----------------------------------------------------------------------------------- ranking
def test_rank_cells_and_kendall_tau():
    a = {"x": 0.5, "y": 0.4, "z": 0.3, "w": 0.1}
    assert report_stats.rank_cells(a) == {"x": 1.0, "y": 2.0, "z": 3.0, "w": 4.0}
    assert report_stats.rank_cells({"x": 0.5, "y": 0.5, "z": 0.1}) == {"x": 1.5, "y": 1.5, "z": 3.0}
    tau, p = report_stats.kendall(a, {k: 2 * v for k, v in a.items()})
    assert tau == pytest.approx(1.0) and p < 0.1
    tau, _ = report_stats.kendall(a, {k: -v for k, v in a.items()})
    assert tau == pytest.approx(-1.0)
    tau, _ = report_stats.kendall(a, {"x": 0.3, "y": 0.4, "z": 0.5, "w": 0.2})
    # by hand: pairs (x,y) d (x,z) d (x,w) c (y,z) d (y,w) c (z,w) c -> (3 - 3) / 6 = 0
    assert tau == pytest.approx(0.0)
    assert all(math.isnan(v) for v in report_stats.kendall({"x": 1.0}, {"x": 2.0}))


def test_half_and_full_picks_the_validation_nearest_half_the_final_step():
    steps, values = [100, 200, 300, 400], [0.1, 0.2, 0.3, 0.4]
    assert report_stats.half_and_full(steps, values) == (200, 0.2, 400, 0.4)
    assert report_stats.half_and_full(steps, values, max_step=500) == (200, 0.2, 400, 0.4)  # 250: tie, the earlier
    assert report_stats.half_and_full(steps, values, max_step=700) == (300, 0.3, 400, 0.4)
    assert report_stats.half_and_full([400, 100, 300], [0.4, 0.1, 0.3]) == (100, 0.1, 400, 0.4)  # unsorted input
    with pytest.raises(ValueError):
        report_stats.half_and_full([], [])


def write_summary_events(run_dir: Path, scalars: dict[str, list[tuple[int, float]]], final_step: int) -> None:
    """Event files through torch's SummaryWriter, and the run's final_metrics.json."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(run_dir)) as w:
        for tag, points in scalars.items():
            for step, value in points:
                w.add_scalar(tag, value, step)
    last = {tag: points[-1][1] for tag, points in scalars.items()}
    (run_dir / "final_metrics.json").write_text(json.dumps({**last, "step": final_step}))


def make_ranking_ablation(runs_dir: Path, name: str, seeds: dict[str, int], settings: dict | None = None) -> None:
    """Three cells whose order at half budget (a > b > c) is the reverse of the final one (c > b > a) for t2i
    R@1; semantic t2i keeps its order. Validations at steps 0, 40, 80, 100 (final step 100: half = 40).
    ``settings``: the manifest's "report" entry (none by default, as in a manifest from before it existed)."""
    half = {"a": 0.30, "b": 0.20, "c": 0.10}
    full = {"a": 0.40, "b": 0.50, "c": 0.60}
    for cell, n in seeds.items():
        for seed in range(n):
            noise = 0.001 * seed
            t2i = [(0, 0.0), (40, half[cell] + noise), (80, full[cell] - 0.05), (100, full[cell] + noise)]
            sem = [(0, 0.0), (40, half[cell] + 0.1), (80, half[cell] + 0.15), (100, half[cell] + 0.2 + noise)]
            write_summary_events(runs_dir / name / cell / f"seed_{seed}",
                                 {"val/t2i/R@1": t2i, "val/semantic/t2i/R@1": sem, "val/i2t/R@1": t2i,
                                  "val/semantic/i2t/R@1": sem}, final_step=100)
    manifest = dict(ablation=name, baseline="a", cells=[dict(name=c, description=f"cell {c}") for c in seeds])
    if settings is not None:
        manifest["report"] = settings
    (runs_dir / name / "ablation.json").write_text(json.dumps(manifest))


def test_ranking_at_half_and_full_budget_from_event_files(tmp_path):
    make_ranking_ablation(tmp_path / "runs", "toy", {"a": 3, "b": 3, "c": 3})
    runs = report.load_runs(tmp_path / "runs" / "toy", tags=report.RANKING_TAGS)
    assert runs["a"][0].step == 100 and list(runs["a"][0].scalars["val/t2i/R@1"][0]) == [0, 40, 80, 100]
    assert set(runs["a"][0].scalars) == set(report.RANKING_TAGS)  # only the tags asked for
    assert runs["a"][0].metrics["val/t2i/R@1"] == pytest.approx(0.40)  # final_metrics.json, same walk
    rows = ranking.ranking_stability(runs)
    t2i = {r["cell"]: r for r in rows if r["tag"] == "val/t2i/R@1"}
    sem = {r["cell"]: r for r in rows if r["tag"] == "val/semantic/t2i/R@1"}
    assert t2i["a"]["half"] == pytest.approx(0.301, abs=1e-6) and t2i["a"]["half_step"] == 40
    assert [t2i[c]["half_rank"] for c in "abc"] == [1, 2, 3] and [t2i[c]["full_rank"] for c in "abc"] == [3, 2, 1]
    assert t2i["a"]["kendall_tau"] == pytest.approx(-1.0)
    assert sem["a"]["kendall_tau"] == pytest.approx(1.0) and sem["c"]["full_rank"] == 3
    written = report.write_report("toy", tmp_path / "runs", tmp_path / "results", plots=False)
    md = written["md"].read_text()
    assert "## Ranking at half and full budget" in md
    assert "| `c` | 3 | 40 | 10.1 | 3 | 100 | 60.1 | 1 |" in md
    assert "Kendall's τ = -1.000" in md and "Kendall's τ = 1.000" in md
    table = list(__import__("csv").DictReader(written["ranking"].open()))
    assert len(table) == 6 and {r["tag"] for r in table} == set(report.RANKING_TAGS)
    assert float(next(r for r in table if r["tag"] == "val/t2i/R@1")["kendall_tau"]) == pytest.approx(-1.0)
    back = report.read_csv(written["ranking"])  # the notebook reads every results/*.csv with read_csv
    assert back[0]["tag"] == "val/t2i/R@1" and back[0]["n_seeds"] == 3 and isinstance(back[0]["half"], float)


# ----------------------------------------------------------------------------------- convergence
def test_plateau_summary_by_hand():
    curves = {
        # one seed: final 0.50 (also the best), within 0.02 from step 30 (0.49)
        "one": {"val/t2i/R@1": [(np.array([0, 10, 20, 30, 40]), np.array([0.0, 0.3, 0.45, 0.49, 0.50]))]},
        # three seeds: mean curve 0.1, 0.6, 0.4, 0.41 -> final 0.41, best 0.6 at 10, within 0.02 first at 20
        "three": {"val/t2i/R@1": [(np.array([0, 10, 20, 30]), np.array([0.1, 0.6, 0.4, 0.41]) + d)
                                  for d in (-0.01, 0.0, 0.01)]},
        "none": {},
    }
    rows = {r["cell"]: r for r in budget.plateau_summary(curves)}
    assert set(rows) == {"one", "three"}
    one, three = rows["one"], rows["three"]
    assert (one["n_seeds"], one["final_step"], one["final"], one["best"], one["best_step"], one["plateau_step"]) \
        == (1, 40, 0.50, 0.50, 40, 30)
    assert three["n_seeds"] == 3 and three["final"] == pytest.approx(0.41)
    assert three["best"] == pytest.approx(0.6) and three["best_step"] == 10 and three["plateau_step"] == 20
    assert budget.plateau_summary(curves, tolerance=0.0)[0]["plateau_step"] == 40
    md = budget.format_plateau(budget.plateau_summary(curves))
    assert "## Convergence" in md and "| `three` | 3 | 30 | 41.0 | 60.0 | 10 | 20 |" in md


#: what the runner declares for the convergence ablation (its manifest's "report" entry)
CONVERGENCE = {"curve_tags": list(report.CONVERGENCE_TAGS), "plateau": True, "budget_against": "losses"}


@pytest.fixture
def drawn_tags(monkeypatch) -> dict:
    """{"tags": the panels of the last curves plot the report drew}."""
    seen = {}
    original = plots.plot_curves

    def spy(curves, **kw):
        seen["tags"] = kw.get("tags")
        return original(curves, **kw)

    monkeypatch.setattr(plots, "plot_curves", spy)
    return seen


def test_convergence_report_with_one_seed_for_most_cells(tmp_path, drawn_tags):
    make_ranking_ablation(tmp_path / "runs", "convergence", {"a": 3, "b": 1, "c": 1}, settings=CONVERGENCE)
    written = report.write_report("convergence", tmp_path / "runs", tmp_path / "results")
    assert drawn_tags["tags"] == report.CONVERGENCE_TAGS
    assert png_pixels(written["curves"]).shape == (round(4.2 * 120), 4 * 6 * 120, 3)  # one panel per tag
    md = written["md"].read_text()
    assert "## Convergence" in md and "## Ranking at half and full budget" in md
    assert "(1/3 seeds per cell)" in md
    # every panel, every cell: 4 tags x 3 cells; b has one seed, final 0.5 reached within 2 points at 100
    assert md.count("| `b` | 1 | 100 |") == 4
    assert "## Default budget vs plateau" not in md  # no runs/losses to compare with
    # an ablation that declares nothing: the default curves and no plateau table; --curve-tags overrides the panels
    from lightning_clip.report.cli import main

    make_ranking_ablation(tmp_path / "runs", "other", {"a": 1, "b": 1})
    assert main(["--ablation", "other", "--runs-dir", str(tmp_path / "runs"), "--results-dir",
                 str(tmp_path / "results"), "--curve-tags", "val/i2t/R@1", "val/semantic/i2t/R@1"]) == 0
    assert drawn_tags["tags"] == ("val/i2t/R@1", "val/semantic/i2t/R@1")
    assert "## Convergence" not in (tmp_path / "results" / "other.md").read_text()
    # the option overrides the manifest's panels too, and leaves its tables
    assert main(["--ablation", "convergence", "--runs-dir", str(tmp_path / "runs"), "--results-dir",
                 str(tmp_path / "results"), "--curve-tags", "val/i2t/R@1"]) == 0
    assert drawn_tags["tags"] == ("val/i2t/R@1",)
    md = (tmp_path / "results" / "convergence.md").read_text()
    assert "## Convergence" in md and md.count("| `b` | 1 | 100 |") == 1


def test_the_manifest_not_the_name_asks_for_the_convergence_tables(tmp_path, drawn_tags):
    runs, results = tmp_path / "runs", tmp_path / "results"
    # named `convergence` but declaring nothing (a manifest from before the "report" entry): the defaults
    make_ranking_ablation(runs, "convergence", {"a": 2, "b": 2})
    md = report.write_report("convergence", runs, results, plots=False)["md"].read_text()
    assert "## Convergence" not in md and "## Default budget vs plateau" not in md
    report.write_report("convergence", runs, results)
    assert drawn_tags["tags"] == report.CURVE_TAGS
    # null values are the defaults too
    make_ranking_ablation(runs, "nulls", {"a": 1}, settings={"curve_tags": None, "plateau": None,
                                                             "budget_against": None})
    report.write_report("nulls", runs, results)
    assert drawn_tags["tags"] == report.CURVE_TAGS
    assert "## Convergence" not in (results / "nulls.md").read_text()

    # another name that declares them gets them; the budget table compares with the declared ablation's runs
    make_ranking_ablation(runs, "long", {"a": 2, "b": 2, "c": 1},
                          settings={"curve_tags": ["val/i2t/R@1"], "plateau": True, "budget_against": "short"})
    make_ranking_ablation(runs, "short", {"a": 2, "b": 1})  # c never ran at the short budget
    md = report.write_report("long", runs, results)["md"].read_text()
    assert drawn_tags["tags"] == ("val/i2t/R@1",)
    order = [md.index(h) for h in ("## Convergence", "## Default budget vs plateau", "## Ranking at half")]
    assert order == sorted(order)
    plateau = md[order[0]:order[1]]
    assert "### i2t R@1 (%)" in plateau and "### t2i R@1" not in plateau  # the declared curves only
    budget = md[order[1]:order[2]]
    assert "`runs/short`" in budget
    assert [line.split("|")[1].strip() for line in budget.splitlines() if line.startswith("| `")] == ["`a`", "`b`"]
    # plateau off, and a budget_against with no runs folder: neither table, no error
    make_ranking_ablation(runs, "quiet", {"a": 1}, settings={"plateau": False, "budget_against": "absent"})
    md = report.write_report("quiet", runs, results, plots=False)["md"].read_text()
    assert "## Convergence" not in md and "## Default budget vs plateau" not in md


@pytest.mark.parametrize("settings, key", [
    ({"plateau": "yes"}, "plateau"), ({"curve_tags": "val/t2i/R@1"}, "curve_tags"), ({"curve_tags": []}, "curve_tags"),
    ({"budget_against": 3}, "budget_against"), ({"plateu": True}, "plateu"), (["plateau"], "report")])
def test_a_malformed_report_entry_is_an_error_that_names_it(tmp_path, settings, key):
    make_ranking_ablation(tmp_path / "runs", "bad", {"a": 1}, settings=settings)
    with pytest.raises(ValueError, match=key):
        report.write_report("bad", tmp_path / "runs", tmp_path / "results", plots=False)
    assert not (tmp_path / "results").exists()


def test_welch_difference_against_scipy_and_the_budget_table():
    from lightning_clip.report.budget import budget_gaps, format_budget
    from lightning_clip.report.stats import welch_difference

    a, b = [0.90, 0.91, 0.89], [0.86, 0.88, 0.85]
    d = welch_difference(a, b)
    t = stats.ttest_ind(a, b, equal_var=False)
    assert d.mean == pytest.approx(np.mean(a) - np.mean(b))
    # the interval excludes zero exactly when Welch's two-sided test rejects at 5%
    assert d.excludes_zero == (t.pvalue < 0.05)
    half = d.half_width
    assert t.statistic == pytest.approx(d.mean / (half / stats.t.ppf(0.975, t.df)), rel=1e-6)
    assert math.isnan(welch_difference(a, [0.8]).low) and welch_difference(a, [0.8]).mean == pytest.approx(0.1)
    plateau = {"infonce": {s: {"val/t2i/R@1": v} for s, v in enumerate(a)}, "dcl": {0: {"val/t2i/R@1": 0.5}}}
    default = {"infonce": {s: {"val/t2i/R@1": v} for s, v in enumerate(b)}}
    rows = budget_gaps(plateau, default, keys=["val/t2i/R@1"])
    assert [r["cell"] for r in rows] == ["infonce"]  # dcl has no default-budget runs
    text = format_budget(rows, "losses", keys=["val/t2i/R@1"])
    assert "| `infonce` | 86.3 ± " in text and f"{100 * d.mean:+.1f} [" in text


def test_eval_json_scalars_become_table_columns(tmp_path):
    from lightning_clip.eval.records import record

    make_fake_ablation(tmp_path, events=False)
    for seed in (0, 1, 2):
        for cell, acc in (("infonce", 0.5), ("siglip", 0.7), ("dcl", 0.5)):
            recs = [record("w/val/color_shape", "zeroshot_classification", {"top1": acc + 0.01 * seed}),
                    record("w/val", "embedding_geometry", {"modality_gap": 0.3, "uniformity_image": -2.0})]
            (tmp_path / "losses" / cell / f"seed_{seed}" / "eval.json").write_text(json.dumps(recs))
    metrics = report.metrics_of(report.load_runs(tmp_path / "losses"))
    assert metrics["siglip"][1]["eval/zeroshot_classification/color_shape/top1"] == pytest.approx(0.71)
    md = report.write_report("losses", runs_dir=tmp_path, results_dir=tmp_path / "results")["md"].read_text()
    assert "zero-shot colour+shape" in md and "modality gap" in md
    # siglip's +20 points on every seed is a paired difference with an interval that excludes zero
    assert "+20.0" in md
