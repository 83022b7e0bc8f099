"""The confirm stage's table (results/<ablation>.md, .csv): every cell at the default recipe and at its
tuned setting, on the held-out **test** split (eval_test.json of each run), with the statistics its claims
need:

- per cell and recipe: the mean over seeds with its 95% t-interval;
- what tuning moved: tuned − default, paired by seed;
- each tuned cell against the tuned baseline on the primary metric (t2i R@1), paired by seed: the
  difference with a Bonferroni interval (family-wise 95% over the m comparisons) and Holm's adjusted
  p-value; "above"/"below" only where Holm rejects at 5%, "equivalent" only where the two one-sided tests
  (TOST, Holm-adjusted too) reject a difference of at least the margin, else "undecided";
- Kendall's τ between the default and the tuned ranking, overall and within the leading group (the cells
  Holm does not put below the best tuned cell).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Mapping

from lightning_clip.files import atomic_write

from .load import load_runs, read_manifest, seed_of
from .machines import machine_lines
from .stats import holm, kendall, paired_difference, paired_p, rank_cells, t_interval, tost, verdict
from .tables import write_csv

TEST_FILE = "eval_test.json"
RETRIEVAL = "zeroshot_retrieval"
#: the table's metrics: (label, how to read it from a run's test retrieval record)
PRIMARY = "t2i R@1"
COLUMNS = {
    "t2i R@1": lambda m: m["image_retrieval_recall@1"],
    "i2t R@1": lambda m: m["text_retrieval_recall@1"],
    "rsum": lambda m: sum(m[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in (1, 5, 10)),
    "semantic t2i R@1": lambda m: m["semantic_t2i_R@1"],
}
CEILINGS = {"oracle ceiling": ("ceiling_t2i_R@1", "ceiling_i2t_R@1"), "Bayes ceiling": ("bayes_t2i_R@1", "bayes_i2t_R@1")}


def load_test(ablation_dir: Path, cells, task: str = RETRIEVAL, optional: bool = False
              ) -> dict[str, dict[int, dict[str, float]]]:
    """{cell: {seed: metrics of the ``task`` record}} from every <cell>/seed_<k>/eval_test.json. A run
    without that record is an error, or left out when ``optional`` (the variance calibration exists only
    for families with log-std heads)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells:
        for path in sorted((Path(ablation_dir) / cell).glob(f"seed_*/{TEST_FILE}")):
            seed = seed_of(path.parent)
            if seed is None:  # seed_0_old: a folder put aside, not seed 0
                continue
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
                found = [r["metrics"] for r in records if r["task"] == task]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: unreadable evaluation records ({e})") from None
            if not found and not optional:
                raise ValueError(f"{path}: no {task} record")
            if found:
                out.setdefault(cell, {})[seed] = found[0]
    return out


def _values(runs: Mapping[int, Mapping[str, float]], label: str) -> dict[int, float]:
    return {s: 100.0 * COLUMNS[label](m) for s, m in runs.items()}


def _ci(i, decimals: int = 1) -> str:
    if i.n == 0:
        return "–"
    f = f".{decimals}f"
    return f"{i.mean:{f}}" + ("" if i.n < 2 else f" [{i.low:{f}}, {i.high:{f}}]") + f" ({i.n})"


def compare(default, tuned, baseline: str, margin: float, alpha: float = 0.05) -> list[dict]:
    """One row per cell with both recipes' intervals, the tuning effect and the tuned comparison with the
    baseline (see the module's docstring)."""
    cells = [c for c in dict.fromkeys([*tuned, *default])]
    others = [c for c in cells if c != baseline and c in tuned and baseline in tuned]
    m = max(1, len(others))
    primary = {c: _values(tuned[c], PRIMARY) for c in tuned}
    p_diff = holm({c: paired_p(primary[c], primary[baseline]) for c in others})
    p_equiv = holm({c: tost(primary[c], primary[baseline], margin) for c in others})
    rows = []
    for c in cells:
        row = {"cell": c}
        for label in COLUMNS:
            d = _values(default.get(c, {}), label)
            t = _values(tuned.get(c, {}), label)
            row[f"default {label}"], row[f"tuned {label}"] = t_interval(d.values()), t_interval(t.values())
            row[f"tuning effect {label}"] = paired_difference(t, d)
        if c in others:
            row["vs baseline"] = paired_difference(primary[c], primary[baseline], 1 - alpha / m)
            row["holm p"], row["tost p"] = p_diff[c], p_equiv[c]
            row["verdict"] = verdict(row["vs baseline"], p_diff[c], p_equiv[c], margin, alpha)
        rows.append(row)
    return rows


def leading_group(tuned, alpha: float = 0.05) -> list[str]:
    """The best tuned cell (primary metric) and every cell Holm does not put below it."""
    means = {c: t_interval(_values(r, PRIMARY).values()).mean for c, r in tuned.items()}
    if not means:
        return []
    best = max(means, key=means.get)
    p = holm({c: paired_p(_values(tuned[best], PRIMARY), _values(tuned[c], PRIMARY)) for c in means if c != best})
    return [best] + [c for c in means if c != best and not p[c] < alpha]


def _ceiling_line(tuned) -> str:
    parts = []
    for name, keys in CEILINGS.items():
        values = [[100.0 * m[k] for r in tuned.values() for m in r.values() if k in m] for k in keys]
        if all(values):
            parts.append(f"{name} t2i {sum(values[0]) / len(values[0]):.1f}, i2t {sum(values[1]) / len(values[1]):.1f}")
    return ("Ceilings on the test split (expected R@1 of a perfect scorer; the Bayes ceiling ranks by the caption "
            "generator's own likelihood): " + "; ".join(parts) + ".") if parts else ""


def write_confirm(ablation: str, runs_dir="runs", results_dir="results", margin: float = 1.5) -> dict[str, Path]:
    default_dir, tuned_dir = Path(runs_dir) / ablation, Path(runs_dir) / f"{ablation}_tuned"
    manifest = read_manifest(tuned_dir)
    cells = [c["name"] for c in manifest["cells"]]
    baseline = manifest["baseline"]
    default, tuned = load_test(default_dir, cells), load_test(tuned_dir, cells)
    if baseline not in tuned:
        raise FileNotFoundError(f"no {TEST_FILE} for the tuned baseline under {tuned_dir / baseline}")
    rows = compare(default, tuned, baseline, margin)
    means = {lab: {r["cell"]: r[f"{lab} {PRIMARY}"].mean for r in rows} for lab in ("default", "tuned")}
    tau, _ = kendall(means["default"], means["tuned"])
    lead = leading_group(tuned)
    tau_lead, _ = kendall({c: means["default"][c] for c in lead}, {c: means["tuned"][c] for c in lead})
    rank_d, rank_t = rank_cells({c: v for c, v in means["default"].items() if math.isfinite(v)}), rank_cells(means["tuned"])
    m = len([r for r in rows if "vs baseline" in r])
    head = ["cell", *(f"{lab} {PRIMARY}" for lab in ("default", "tuned")), f"tuning effect {PRIMARY}",
            "tuned i2t R@1", "tuned rsum", "tuned semantic t2i R@1", f"tuned − `{baseline}` {PRIMARY}", "verdict",
            "rank default → tuned"]
    lines = [f"# {ablation}: default recipe vs tuned, on the held-out test split", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} from {default_dir.as_posix()} and {tuned_dir.as_posix()} "
             f"(eval_test.json). Mean over seeds [95% t-interval] (seeds), in percent.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r["cell"]
        vs = r.get("vs baseline")
        lines.append("| " + " | ".join([
            f"`{c}`" + (" (baseline)" if c == baseline else ""), _ci(r[f"default {PRIMARY}"]), _ci(r[f"tuned {PRIMARY}"]),
            _ci(r[f"tuning effect {PRIMARY}"]), _ci(r["tuned i2t R@1"]), _ci(r["tuned rsum"]),
            _ci(r["tuned semantic t2i R@1"]), _ci(vs) + (f", Holm p {r['holm p']:.3f}" if vs is not None and
                                                          math.isfinite(r["holm p"]) else "") if vs else "",
            r.get("verdict", ""), f"{rank_d.get(c, math.nan):g} → {rank_t.get(c, math.nan):g}"]) + " |")
    lines += ["", f"Tuned − baseline: paired by seed, Bonferroni interval at family-wise 95% over {m} comparisons; "
              f"verdicts by Holm at 5% where the interval agrees (difference) and by TOST with margin "
              f"±{margin:g} points, Holm-adjusted (equivalence). One-seed cells have no interval and no verdict.",
              f"Kendall's τ between the default and the tuned ranking ({PRIMARY} means): "
              + (f"{tau:.2f}" if math.isfinite(tau) else "undefined (ties or fewer than two cells)")
              + f" over {len(rows)} cells; within the leading group ({', '.join(f'`{c}`' for c in lead)}): "
              + (f"{tau_lead:.2f}." if math.isfinite(tau_lead) else "undefined (ties or fewer than two cells).")]
    ceiling = _ceiling_line(tuned)
    if ceiling:
        lines += ["", ceiling]
    for label, folder in (("default recipe", default_dir), ("tuned", tuned_dir)):
        machines = machine_lines(load_runs(folder, cells), label)
        lines += ["", *machines] if machines else []
    return write_table(results_dir, ablation, lines, rows)


def write_table(results_dir, ablation: str, lines: list[str], rows: list[dict], rename=lambda k: k) -> dict[str, Path]:
    """results/<ablation>.md from ``lines`` and .csv from ``rows`` (an interval becomes its mean, low, high
    and n columns; an empty one none; ``rename`` maps a row key to its column name)."""
    flat = []
    for r in rows:
        out = {"cell": r["cell"]}
        for k, v in r.items():
            if hasattr(v, "mean"):
                if v.n:
                    out.update({f"{rename(k)} {part}": getattr(v, part) for part in ("mean", "low", "high", "n")})
            elif k != "cell":
                out[rename(k)] = v
        flat.append(out)
    results_dir = Path(results_dir)
    return {"md": atomic_write(results_dir / f"{ablation}.md", "\n".join(lines) + "\n"),
            "csv": atomic_write(results_dir / f"{ablation}.csv",
                                write_csv(flat, list(dict.fromkeys(k for r in flat for k in r))))}
