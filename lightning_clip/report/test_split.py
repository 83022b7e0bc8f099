"""The test-split table of a design ablation on the fair protocol (`confirm:` without `tune:` in its
_ablation.yaml): results/<ablation>.md, .csv, from each run's eval_test.json.

- per cell: the mean over seeds with its 95% t-interval (t2i / i2t R@1, rsum, semantic t2i R@1);
- each cell against the baseline on t2i R@1, paired by seed, as the confirm stage does (`confirm.compare`):
  Bonferroni interval, Holm's adjusted p, "above"/"below" only where Holm rejects, "equivalent" only where
  the TOST (Holm-adjusted) rejects a difference of the margin or more;
- when the cells are a series grid (`<series>-<prefix><number>`, batch_size's `siglip-b16`): the
  interaction. For every series S other than the baseline's series B and every x other than the
  baseline's x0, the difference of differences, paired by seed,

      Δ(S, x) = (S_x − B_x) − (S_x0 − B_x0)

  "S's gap to B changes between x0 and x" is a claim about Δ, not about two overlapping intervals. Holm over
  all Δ, Bonferroni intervals, verdicts as above.
- the pairs the ablation declares (`report.pairs` in its _ablation.yaml: `[[A, B], ...]`), A − B paired by
  seed for two cells neither of which is the baseline (gcl_scale: a frozen scale against the learned one).
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path


from .columns import series_of
from .confirm import PRIMARY, _ceiling_line, _ci, _values, compare, load_test, write_table
from .load import load_runs, read_manifest
from .machines import machine_lines
from .settings import settings_of
from .stats import holm, paired_difference, paired_p, t_interval, tost, verdict

SHOWN = ("t2i R@1", "i2t R@1", "rsum", "semantic t2i R@1")
CALIBRATION = "variance_calibration"
#: the calibration section, for cells with log-std heads: (key in the record, label, scale, decimals)
CALIBRATION_SHOWN = (("text_ause", "AUSE (text)", 1, 3), ("image_ause", "AUSE (image)", 1, 3),
                     ("text_R@1_decile_1", "t2i R@1 (most certain tenth)", 100, 1),
                     ("text_R@1_decile_10", "t2i R@1 (least certain tenth)", 100, 1))


def calibration_lines(calibration, rows: list[dict]) -> list[str]:
    """The markdown section of the calibration columns (mean [95% t-interval] (seeds)); adds each interval
    to its cell's row, so that the CSV carries it too. [] when no cell has log-std heads."""
    if not calibration:
        return []
    lines = ["", "## Variance calibration on the test split", "",
             "Cells with log-std heads: AUSE (area between the sparsification curve and the oracle's; 0 = the "
             "log-std orders the retrieval errors exactly) and t2i R@1 of the tenth of the test captions with "
             "the smallest and the largest predicted log-std. Mean [95% t-interval] (seeds).", "",
             "| cell | " + " | ".join(label for _, label, _, _ in CALIBRATION_SHOWN) + " |",
             "|" + "---|" * (len(CALIBRATION_SHOWN) + 1)]
    by_cell = {r["cell"]: r for r in rows}   # every cell with a test evaluation has its row
    for cell, seeds in calibration.items():
        shown = []
        for key, label, scale, decimals in CALIBRATION_SHOWN:
            by_cell[cell][f"tuned {label}"] = i = t_interval(scale * m[key] for m in seeds.values() if key in m)
            shown.append(_ci(i, decimals))
        lines.append(f"| `{cell}` | " + " | ".join(shown) + " |")
    return lines


def interactions(runs, baseline: str, margin: float, alpha: float = 0.05) -> list[dict]:
    """The Δ(S, x) rows of a series grid (module docstring); [] when the cells are not one."""
    parsed = series_of(list(runs))
    if parsed is None or baseline not in parsed[0]:
        return []
    where, _ = parsed
    cell_at = {v: c for c, v in where.items()}
    ref_series, x0 = where[baseline]
    primary = {c: _values(r, PRIMARY) for c, r in runs.items()}

    def gap(series: str, x: int) -> dict[int, float] | None:
        a, b = cell_at.get((series, x)), cell_at.get((ref_series, x))
        if a is None or b is None:
            return None
        return {s: primary[a][s] - primary[b][s] for s in set(primary[a]) & set(primary[b])}

    deltas, gaps = {}, {}
    for series in dict.fromkeys(s for s, _ in where.values()):
        g0 = gap(series, x0)
        if series == ref_series or g0 is None:
            continue
        for x in sorted({x for s, x in where.values() if s == series and x != x0}):
            g = gap(series, x)
            if g is not None:
                deltas[(series, x)] = {s: g[s] - g0[s] for s in set(g) & set(g0)}
                gaps[(series, x)] = (g, g0)
    zero = {s: 0.0 for d in deltas.values() for s in d}
    m = max(1, len(deltas))
    p_diff = holm({k: paired_p(d, zero) for k, d in deltas.items()})
    p_equiv = holm({k: tost(d, zero, margin) for k, d in deltas.items()})
    rows = []
    for (series, x), d in deltas.items():
        k = (series, x)
        interval = paired_difference(d, zero, 1 - alpha / m)
        rows.append({"series": series, "x": x, "x0": x0, "reference": ref_series,
                     "gap at x": t_interval(gaps[k][0].values()), "gap at x0": t_interval(gaps[k][1].values()),
                     "delta": interval, "holm p": p_diff[k], "tost p": p_equiv[k],
                     "verdict": verdict(interval, p_diff[k], p_equiv[k], margin, alpha, ("larger", "smaller"))})
    return rows


GAP_METRICS = ("t2i R@1", "semantic t2i R@1")


def paired_gaps(runs, pairs: dict, margin: float, alpha: float = 0.05) -> dict:
    """For each key's (a, b): a − b paired by seed on each of GAP_METRICS (plain and semantic recall side by
    side: duplicates' oracle targets can gain on one and lose on the other). Per metric one family of
    comparisons: Bonferroni intervals, Holm p, Holm-adjusted TOST, verdicts as in the baseline comparison."""
    rows = {k: {} for k in pairs}
    m = max(1, len(pairs))
    for metric in GAP_METRICS:
        values = {c: _values(r, metric) for c, r in runs.items()}
        p_diff = holm({k: paired_p(values[a], values[b]) for k, (a, b) in pairs.items()})
        p_equiv = holm({k: tost(values[a], values[b], margin) for k, (a, b) in pairs.items()})
        for k, (a, b) in pairs.items():
            interval = paired_difference(values[a], values[b], 1 - alpha / m)
            rows[k][metric] = interval
            rows[k][f"{metric} verdict"] = verdict(interval, p_diff[k], p_equiv[k], margin, alpha)
    return rows


def gaps_at_each_x(runs, baseline: str, margin: float, alpha: float = 0.05) -> list[dict]:
    """For a series grid: every series S against the baseline's series B at the same x, S_x − B_x
    (`paired_gaps`). [] when the cells are not a series grid."""
    parsed = series_of(list(runs))
    if parsed is None or baseline not in parsed[0]:
        return []
    where, _ = parsed
    ref_series = where[baseline][0]
    cell_at = {v: c for c, v in where.items()}
    pairs = {(s, x): (c, cell_at[(ref_series, x)]) for c, (s, x) in where.items()
             if s != ref_series and (ref_series, x) in cell_at}
    gaps = paired_gaps(runs, pairs, margin, alpha)
    rows = [{"series": s, "x": x, "reference": ref_series, **gaps[(s, x)]} for s, x in pairs]
    return sorted(rows, key=lambda r: (r["series"], r["x"]))


def declared_pairs(runs, pairs, margin: float, where: str = "report.pairs") -> list[dict]:
    """The ablation's own comparisons between two non-baseline cells (report.pairs: a frozen against a
    learned scale, say), A − B paired by seed (`paired_gaps`), a family of their own. A pair naming a cell
    without test evaluations is an error that names it."""
    for a, b in pairs:
        for c in (a, b):
            if c not in runs:
                raise ValueError(f"{where}: no eval_test.json for cell '{c}' of the pair {[a, b]} "
                                 f"(cells with test evaluations: {sorted(runs)})")
    gaps = paired_gaps(runs, {(a, b): (a, b) for a, b in pairs}, margin)
    return [{"a": a, "b": b, **gaps[(a, b)]} for a, b in pairs]


def _paired_section(heading: str, note: str, key_head: str, keyed: list[tuple[str, dict]], metric_head: str) -> list[str]:
    """A markdown section of paired comparisons on GAP_METRICS: one row per (key cells, row of `paired_gaps`)."""
    if not keyed:
        return []
    lines = ["", heading, "", note, "", f"| {key_head} | " + " | ".join(f"{m}{metric_head} | verdict" for m in GAP_METRICS)
             + " |", "|" + "---|" * (key_head.count("|") + 1 + 2 * len(GAP_METRICS))]
    for key, r in keyed:
        lines.append(f"| {key} | " + " | ".join(f"{_ci(r[m])} | {r[f'{m} verdict']}" for m in GAP_METRICS) + " |")
    return lines


def pair_lines(pairs: list[dict], margin: float) -> list[str]:
    return _paired_section(
        "## Declared pairs (`report.pairs`)",
        f"A − B, paired by seed: Bonferroni interval over the {len(pairs)} pair(s) of each metric; above / below "
        f"where Holm rejects at 5% and the interval excludes 0, TOST ±{margin:g} (Holm-adjusted); a family of its "
        "own, apart from the comparisons with the baseline.",
        "A − B", [(f"`{r['a']}` − `{r['b']}`", r) for r in pairs], "")


def gap_lines(gaps: list[dict], margin: float) -> list[str]:
    ref = gaps[0]["reference"] if gaps else ""
    return _paired_section(
        f"## Each series against `{ref}` at the same x",
        f"S at x − `{ref}` at x, paired by seed: Bonferroni interval over the {len(gaps)} comparisons of each "
        f"metric; above / below where Holm rejects at 5% and the interval excludes 0, TOST ±{margin:g} "
        "(Holm-adjusted); each metric is a family of its own.",
        "series | x", [(f"`{r['series']}` | {r['x']}", r) for r in gaps], " gap")


def write_test(ablation: str, runs_dir="runs", results_dir="results", margin: float = 1.5) -> dict[str, Path]:
    folder = Path(runs_dir) / ablation
    manifest = read_manifest(folder)
    declared = settings_of(manifest).pairs
    cells = [c["name"] for c in manifest["cells"]]
    baseline = manifest["baseline"]
    runs = load_test(folder, cells)
    if baseline not in runs:
        raise FileNotFoundError(f"no eval_test.json for the baseline under {folder / baseline}")
    rows = compare({}, runs, baseline, margin)
    m = len([r for r in rows if "vs baseline" in r])
    head = ["cell", *SHOWN, f"− `{baseline}` {PRIMARY}", "verdict"]
    lines = [f"# {ablation}: on the held-out test split", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} from {folder.as_posix()} (eval_test.json). Mean over "
             "seeds [95% t-interval] (seeds), in percent.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, vs = r["cell"], r.get("vs baseline")
        lines.append("| " + " | ".join([
            f"`{c}`" + (" (baseline)" if c == baseline else ""), *(_ci(r[f"tuned {s}"]) for s in SHOWN),
            (_ci(vs) + (f", Holm p {r['holm p']:.3f}" if math.isfinite(r["holm p"]) else "")) if vs else "",
            r.get("verdict", "") if vs is not None and vs.n >= 2 else ""]) + " |")
    lines += ["", f"Cell − baseline: paired by seed, Bonferroni interval at family-wise 95% over {m} comparisons; "
              f"verdicts by Holm at 5% where the interval agrees (difference) and by TOST with margin "
              f"±{margin:g} points, Holm-adjusted (equivalence). One-seed cells have no interval and no verdict."]
    gaps = gaps_at_each_x(runs, baseline, margin)
    lines += gap_lines(gaps, margin)
    pairs = declared_pairs(runs, declared, margin, where=f"{folder / 'ablation.json'}: report.pairs")
    lines += pair_lines(pairs, margin)
    inter = interactions(runs, baseline, margin)
    if inter:
        ref, x0 = inter[0]["reference"], inter[0]["x0"]
        lines += ["", f"## Interaction: does a series' gap to `{ref}` change with x?", "",
                  f"Δ = (S at x − `{ref}` at x) − (S at {x0} − `{ref}` at {x0}), {PRIMARY}, paired by seed; Bonferroni "
                  f"interval over {len(inter)} interactions, Holm p, TOST ±{margin:g} (the cells' margin, on a "
                  "difference of differences: about twice a difference's variance, so equivalence is harder to "
                  "show). The interactions are a family of their own, apart from the comparisons above, each "
                  "family-wise 5%. The gaps themselves are per-x 95% t-intervals, paired by seed, uncorrected.", "",
                  "| series | x | gap at x | gap at x0 | Δ | verdict |", "|---|---|---|---|---|---|"]
        for r in inter:
            holm_p = f", Holm p {r['holm p']:.3f}" if math.isfinite(r["holm p"]) else ""
            lines.append(f"| `{r['series']}` | {r['x']} | {_ci(r['gap at x'])} | {_ci(r['gap at x0'])} | "
                         f"{_ci(r['delta'])}{holm_p} | {r['verdict']} |")
    lines += calibration_lines(load_test(folder, cells, CALIBRATION, optional=True), rows)
    ceiling = _ceiling_line(runs)
    if ceiling:
        lines += ["", ceiling]
    machines = machine_lines(load_runs(folder, cells))
    lines += ["", *machines] if machines else []
    deltas = [{"cell": f"Δ {r['series']} x={r['x']}", **{k: v for k, v in r.items() if k != "series"}} for r in inter]
    same_x = [{"cell": f"{r['series']} − {r['reference']} x={r['x']}", "x": r["x"],
               **{f"gap {k}": v for k, v in r.items() if k not in ("series", "reference", "x")}} for r in gaps]
    declared_rows = [{"cell": f"{r['a']} − {r['b']}", **{f"gap {k}": v for k, v in r.items() if k not in ("a", "b")}}
                     for r in pairs]
    return write_table(results_dir, ablation, lines, rows + same_x + declared_rows + deltas, rename=lambda k: k.replace("tuned ", ""))
