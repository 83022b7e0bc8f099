"""Tables, confidence intervals and plots of an ablation: `python -m lightning_clip.report --ablation NAME`.

Reads runs/<ablation>/<cell>/seed_<k>/final_metrics.json (a run counts once that file exists: the
results callback writes it atomically at the end) and the TensorBoard events beside it, and writes

    results/<ablation>.md, .csv     one row per cell: mean and 95% Student-t interval over seeds, and the
                                    difference from the baseline cell paired by seed, with its interval
    results/<ablation>_curves.png   validation t2i R@1 and training loss against step (mean, band over seeds)
    results/<ablation>_bars.png     R@1 per cell with intervals (grouped by series when the cell names
                                    are `<series>-<prefix><number>`, e.g. `siglip-b64`, `infonce-dup25`)
    results/<ablation>_ranking.csv  the cells ranked by t2i R@1 (and semantic t2i R@1), mean over seeds,
                                    at half budget (the validation nearest max_step / 2) and at the end,
                                    with Kendall's tau between the two rankings (also a section of the .md)

The markdown states the oracle ceiling (`val/ceiling/{t2i,i2t}/R@1`, the expected R@1 of a perfect
scorer with random tie-breaking on the synthetic world) under the table, or as columns when cells differ.
The `convergence` ablation (or any, with ``curve_tags``) plots the four validation recalls against step and
gets a plateau table (`plateau_summary`: final, best, first step within 2 points of the final value).

Every file is written to a temporary name and renamed into place, so an interruption never leaves a
half table. The functions are the notebook's too (notebooks/compare_losses.ipynb).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
CURVE_TAGS = ("val/t2i/R@1", "train/loss")
#: the curves of a convergence study, one panel each (the default for the ablation named `convergence`)
CONVERGENCE_TAGS = ("val/semantic/t2i/R@1", "val/t2i/R@1", "val/semantic/i2t/R@1", "val/i2t/R@1")
#: metrics whose ranking of the cells is compared at half and full budget (higher is better)
RANKING_TAGS = ("val/t2i/R@1", "val/semantic/t2i/R@1")
#: the oracle ceiling keys (logged by the retrieval callback on the synthetic world)
CEILING_KEYS = ("val/ceiling/t2i/R@1", "val/ceiling/i2t/R@1")
PLATEAU_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    label: str
    scale: float = 1.0   # 100 for recalls, shown in %
    digits: int = 3
    compare: bool = False  # in the paired-difference table


# The table's columns, in order; a column appears only when some run logged the key (temperature/bias
# exists for sigmoid losses only, the variance statistics for probabilistic ones).
METRICS = (
    Metric("val/i2t/R@1", "i2t R@1", 100, 1, True),
    Metric("val/i2t/R@5", "i2t R@5", 100, 1),
    Metric("val/i2t/R@10", "i2t R@10", 100, 1),
    Metric("val/t2i/R@1", "t2i R@1", 100, 1, True),
    Metric("val/t2i/R@5", "t2i R@5", 100, 1),
    Metric("val/t2i/R@10", "t2i R@10", 100, 1),
    Metric("val/semantic/t2i/R@1", "sem t2i R@1", 100, 1, True),
    Metric("val/semantic/i2t/R@1", "sem i2t R@1", 100, 1, True),
    Metric("val/ceiling/t2i/R@1", "ceiling t2i R@1", 100, 1),
    Metric("val/ceiling/i2t/R@1", "ceiling i2t R@1", 100, 1),
    Metric("train/false_negatives", "FN share", 100, 1),
    Metric("variance/text/spearman_specificity", "ρ(text var, specificity)", 1, 3, True),
    Metric("variance/image/spearman_num_objects", "ρ(image var, objects)", 1, 3, True),
    Metric("variance/text/mean", "text var mean", 1, 4),
    Metric("eval/zeroshot_classification/color_shape/top1", "zero-shot colour+shape", 100, 1, True),
    Metric("eval/linear_probe/color_shape/top1", "probe colour+shape", 100, 1, True),
    Metric("eval/embedding_geometry/modality_gap", "modality gap", 1, 3, True),
    Metric("eval/embedding_geometry/uniformity_image", "uniformity (image)", 1, 2, True),
    Metric("train/loss", "train loss", 1, 3),
    Metric("temperature/scale", "scale", 1, 1),
    Metric("temperature/bias", "bias", 1, 2),
    Metric("step", "steps", 1, 0),
    Metric("wall_time_s", "wall (s)", 1, 0),
)
BY_KEY = {m.key: m for m in METRICS}


# ------------------------------------------------------------------------------------------ statistics
@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Marked in the tables. With one seed there is no interval, so nothing is marked."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval: mean ± t_{(1+c)/2, n-1} · s / √n (s with n-1 in the
    denominator). Seeds are few (3), so the normal 1.96 would claim a far narrower interval than t's 4.30."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return NAN_INTERVAL
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(cell: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Interval of cell − baseline over the seeds both have. Pairing by seed removes what a seed does to
    both (data order, initialisation), so it is narrower than comparing two independent intervals."""
    seeds = sorted(set(cell) & set(baseline))
    return t_interval([cell[s] - baseline[s] for s in seeds], confidence)


# ----------------------------------------------------------------------------------------- loading
def _seed_of(path: Path) -> int | None:
    m = re.fullmatch(r"seed_(\d+)", path.name)
    return int(m.group(1)) if m else None


def read_manifest(ablation_dir: Path) -> dict:
    """cells (in order), baseline and descriptions: runs/<ablation>/ablation.json from the runner, else
    the cell folders in alphabetical order with no baseline."""
    ablation_dir = Path(ablation_dir)
    try:
        return json.loads((ablation_dir / "ablation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cells = sorted(p.name for p in ablation_dir.glob("*") if p.is_dir() and any(p.glob("seed_*")))
        return dict(ablation=ablation_dir.name, baseline=None, cells=[dict(name=c, description="") for c in cells])


def load_metrics(ablation_dir: Path, cells: Sequence[str] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """{cell: {seed: {key: value}}} from every final_metrics.json (numbers only; `loss_family` and other
    strings are dropped)."""
    ablation_dir = Path(ablation_dir)
    if cells is None:
        cells = [c["name"] for c in read_manifest(ablation_dir)["cells"]]
    out: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells:
        out[cell] = {}
        for run_dir in sorted((ablation_dir / cell).glob("seed_*")):
            seed = _seed_of(run_dir)
            path = run_dir / "final_metrics.json"
            if seed is None or not path.exists():
                continue
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            out[cell][seed] = {k: float(v) for k, v in raw.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if (run_dir / "eval.json").exists():  # the evaluation suite's scalars (ablate runs it)
                from lightning_clip.eval.records import read_flat

                out[cell][seed].update(read_flat(run_dir / "eval.json"))
    return out


# ------------------------------------------------------------------------------------------ the table
def _col(key: str, what: str) -> str:
    return f"{key} {what}"


def summarize(metrics: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str | None,
              descriptions: Mapping[str, str] | None = None) -> list[dict]:
    """One row per cell (the CSV's rows). Columns per metric key: `<key> mean`, `<key> ci_low`,
    `<key> ci_high`, `<key> n`, and against the baseline `<key> diff`, `<key> diff_ci_low`,
    `<key> diff_ci_high`, `<key> diff_n`, `<key> diff_sig` (1 when the interval excludes zero).
    Values are raw (recall as a fraction); missing means not applicable."""
    keys = present_keys(metrics)
    base = metrics.get(baseline, {}) if baseline else {}
    rows = []
    for cell, seeds in metrics.items():
        row: dict = dict(cell=cell, description=(descriptions or {}).get(cell, ""),
                         baseline=int(cell == baseline), n_seeds=len(seeds))
        for key in keys:
            values = {s: m[key] for s, m in seeds.items() if key in m}
            if not values:
                continue
            iv = t_interval(values.values())
            row.update({_col(key, "mean"): iv.mean, _col(key, "ci_low"): iv.low, _col(key, "ci_high"): iv.high,
                        _col(key, "n"): iv.n})
            base_values = {s: m[key] for s, m in base.items() if key in m}
            if baseline and cell != baseline and base_values:
                d = paired_difference(values, base_values)
                if d.n:
                    row.update({_col(key, "diff"): d.mean, _col(key, "diff_ci_low"): d.low,
                                _col(key, "diff_ci_high"): d.high, _col(key, "diff_n"): d.n,
                                _col(key, "diff_sig"): int(d.excludes_zero)})
        rows.append(row)
    return rows


def series_differences(metrics: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str | None) -> list[dict]:
    """For a series ablation (cells `<series>-<prefix><number>`, see `_series`): each cell minus the baseline
    series' cell *at the same number*, paired by seed (`siglip-b16` − `infonce-b16`). The table against the
    single baseline cell mixes the series effect with the number's; this one isolates the series effect.
    Rows carry ``cell``, ``versus`` and the `summarize` diff columns of the compared keys; [] otherwise."""
    parsed = _series(list(metrics))
    if not baseline or parsed is None or baseline not in parsed[0]:
        return []
    where, _ = parsed
    base_series = where[baseline][0]
    by_point = {point: cell for cell, point in where.items()}
    keys = [k for k in present_keys(metrics) if _metric(k).compare]
    rows = []
    for cell, (series, x) in sorted(where.items(), key=lambda kv: (kv[1][1], kv[1][0])):
        versus = by_point.get((base_series, x))
        if series == base_series or versus is None:
            continue
        row: dict = {"cell": cell, "versus": versus}
        for key in keys:
            a = {s: m[key] for s, m in metrics[cell].items() if key in m}
            b = {s: m[key] for s, m in metrics[versus].items() if key in m}
            d = paired_difference(a, b) if a and b else None
            if d is not None and d.n:
                row.update({_col(key, "diff"): d.mean, _col(key, "diff_ci_low"): d.low,
                            _col(key, "diff_ci_high"): d.high, _col(key, "diff_n"): d.n,
                            _col(key, "diff_sig"): int(d.excludes_zero)})
        rows.append(row)
    return rows


def present_keys(metrics: Mapping[str, Mapping[int, Mapping[str, float]]]) -> list[str]:
    """Known keys in table order, then any other numeric key (sorted), that some run logged."""
    seen = {k for seeds in metrics.values() for m in seeds.values() for k in m}
    return [m.key for m in METRICS if m.key in seen] + sorted(seen - set(BY_KEY) - {"epoch"})


def csv_columns(rows: Sequence[dict]) -> list[str]:
    head = ["cell", "description", "baseline", "n_seeds"]
    rest = []
    for row in rows:
        rest += [k for k in row if k not in head and k not in rest]
    order = {k: i for i, k in enumerate(BY_KEY)}
    # group by metric, in table order
    return head + sorted(rest, key=lambda c: (order.get(c.rsplit(" ", 1)[0], len(order)), c.rsplit(" ", 1)[0],
                                              rest.index(c)))


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(rows), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else (repr(v) if isinstance(v, float) else v))
                    for k, v in row.items()})
    return buf.getvalue()


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a results CSV, numbers as floats (ints for counts and flags), other text as strings,
    blanks left out (also reads `<ablation>_ranking.csv`)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k in ("cell", "description"):
                    row[k] = v or ""
                elif v in ("", None):
                    continue
                elif k in ("baseline", "n_seeds") or k.endswith((" n", " diff_n", " diff_sig")):
                    row[k] = int(v)
                else:
                    try:
                        row[k] = float(v)
                    except ValueError:  # a text column (the ranking CSV's `tag`): kept as it is
                        row[k] = v
            rows.append(row)
    return rows


def _fmt(x: float, metric: Metric) -> str:
    return f"{x * metric.scale:.{metric.digits}f}"


def _metric(key: str) -> Metric:
    return BY_KEY.get(key) or Metric(key, key)


def _keys_of(rows: Sequence[dict], what: str = "mean") -> list[str]:
    keys = []
    for row in rows:
        for col in row:
            key, _, suffix = col.rpartition(" ")
            if suffix == what and key not in keys:
                keys.append(key)
    order = list(BY_KEY)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def _diff_cells(r: Mapping, keys: Sequence[str]) -> list[str]:
    """`+1.2 [0.3, 2.1]` per key from a row's diff columns, bold where the interval excludes zero."""
    cells = []
    for k in keys:
        m, d = _metric(k), r.get(_col(k, "diff"))
        if d is None:
            cells.append("")
            continue
        text = f"{_fmt(d, m):s}" if d < 0 else f"+{_fmt(d, m)}"
        if r.get(_col(k, "diff_n"), 0) >= 2:
            text += f" [{_fmt(r[_col(k, 'diff_ci_low')], m)}, {_fmt(r[_col(k, 'diff_ci_high')], m)}]"
        cells.append(f"**{text}**" if r.get(_col(k, "diff_sig")) else text)
    return cells


def format_markdown(rows: Sequence[dict], ablation: str, *, confidence: float = CONFIDENCE,
                    source: str | None = None, stamp: str | None = None,
                    series: Sequence[dict] | None = None, sections: Sequence[str] = ()) -> str:
    """The results/<ablation>.md text: the table of means ± half-widths, then the paired differences from
    the baseline, then (``series``, from `series_differences`) those at the same setting.
    Only the METRICS columns; the CSV carries every numeric key of final_metrics.json. The oracle ceiling is
    one line under the table when every cell has the same (the same validation world), else a column."""
    keys = [k for k in _keys_of(rows) if k in BY_KEY]
    ceiling = uniform_ceiling(rows)
    if ceiling is not None:
        keys = [k for k in keys if k not in CEILING_KEYS]
    baseline = next((r["cell"] for r in rows if r.get("baseline")), None)
    seeds = sorted({r.get("n_seeds", 0) for r in rows})
    pct = int(round(confidence * 100))
    lines = [f"# Ablation `{ablation}`", ""]
    lines.append(f"Mean ± half-width of the {pct}% Student-t interval over seeds "
                 f"({'/'.join(map(str, seeds))} seeds per cell); recall in % on the validation split"
                 + (f"; baseline `{baseline}`." if baseline else "."))
    if stamp:
        lines.append(stamp)
    lines += ["", "| cell | seeds | " + " | ".join(_metric(k).label for k in keys) + " |",
              "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            m, mean = _metric(k), r.get(_col(k, "mean"))
            if mean is None:
                cells.append("")
            elif r.get(_col(k, "n"), 0) >= 2:
                cells.append(f"{_fmt(mean, m)} ± {_fmt((r[_col(k, 'ci_high')] - r[_col(k, 'ci_low')]) / 2, m)}")
            else:
                cells.append(_fmt(mean, m))
        name = f"`{r['cell']}`" + (" (baseline)" if r.get("baseline") else "")
        lines.append(f"| {name} | {r.get('n_seeds', 0)} | " + " | ".join(cells) + " |")
    if ceiling:
        lines += ["", "Oracle ceiling (expected R@1 of a perfect scorer with random tie-breaking): "
                  + ", ".join(f"{d} {100 * ceiling[k]:.1f}%" for d, k in zip(("t2i", "i2t"), CEILING_KEYS)
                              if k in ceiling) + "."]

    diff_keys = [k for k in _keys_of(rows, "diff") if _metric(k).compare]
    if baseline and diff_keys:
        lines += ["", f"## Difference from `{baseline}`, paired by seed", "",
                  f"cell − baseline on the seeds both ran: mean [{pct}% interval]; **bold** where the interval "
                  "excludes zero.", "",
                  "| cell | " + " | ".join(_metric(k).label for k in diff_keys) + " |",
                  "|---|" + "---:|" * len(diff_keys)]
        lines += [f"| `{r['cell']}` | " + " | ".join(_diff_cells(r, diff_keys)) + " |"
                  for r in rows if not r.get("baseline")]

    series_keys = [k for k in _keys_of(series or [], "diff") if _metric(k).compare]
    if series_keys:
        lines += ["", "## Difference at the same setting, paired by seed", "",
                  f"Each cell minus the baseline series' cell with the same number: mean [{pct}% interval]; "
                  "**bold** where the interval excludes zero.", "",
                  "| cell | versus | " + " | ".join(_metric(k).label for k in series_keys) + " |",
                  "|---|---|" + "---:|" * len(series_keys)]
        lines += [f"| `{r['cell']}` | `{r['versus']}` | " + " | ".join(_diff_cells(r, series_keys)) + " |"
                  for r in series]

    for section in sections:  # e.g. `format_plateau`, `format_ranking`: markdown that starts with "## "
        if section:
            lines += ["", section.rstrip("\n")]
    described = [r for r in rows if r.get("description")]
    if described:
        lines += ["", "## Cells", ""] + [f"- `{r['cell']}`: {r['description']}" for r in described]
    if source:
        lines += ["", f"Source: `{source}` (final_metrics.json of each run)."]
    return "\n".join(lines) + "\n"


def uniform_ceiling(rows: Sequence[dict], tol: float = 1e-6) -> dict[str, float] | None:
    """{ceiling key: value} when every row that has the key has the same mean (one validation world), {}
    when no row has one, None when the cells differ (then the table shows it per cell)."""
    out = {}
    for key in CEILING_KEYS:
        values = [r[_col(key, "mean")] for r in rows if r.get(_col(key, "mean")) is not None
                  and math.isfinite(r[_col(key, "mean")])]
        if not values:
            continue
        if max(values) - min(values) > tol:
            return None
        out[key] = float(np.mean(values))
    return out


# ------------------------------------------------------------------------------------------- curves
def load_scalars(run_dir: str | os.PathLike, tags: Sequence[str] = CURVE_TAGS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} from the TensorBoard event files of one run (tags it lacks are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in have:
            events = acc.Scalars(tag)
            out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return out


def load_curves(ablation_dir: str | os.PathLike, cells: Sequence[str] | None = None,
                tags: Sequence[str] = CURVE_TAGS) -> dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """{cell: {tag: [(steps, values) per seed]}} for the runs that finished (final_metrics.json)."""
    ablation_dir = Path(ablation_dir)
    if cells is None:
        cells = [c["name"] for c in read_manifest(ablation_dir)["cells"]]
    curves: dict = {}
    for cell in cells:
        curves[cell] = {}
        for run_dir in sorted((ablation_dir / cell).glob("seed_*")):
            if not (run_dir / "final_metrics.json").exists():
                continue
            for tag, series in load_scalars(run_dir, tags).items():
                curves[cell].setdefault(tag, []).append(series)
    return curves


def mean_band(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and standard deviation over seeds at every logged step (seeds log the same steps;
    a step some seed lacks averages over those that have it)."""
    steps = np.unique(np.concatenate([s for s, _ in series]))
    mean, std = np.empty(len(steps)), np.zeros(len(steps))
    for i, step in enumerate(steps):
        vals = np.array([v[s == step][-1] for s, v in series if np.any(s == step)])
        mean[i] = vals.mean()
        std[i] = vals.std(ddof=1) if len(vals) > 1 else 0.0
    return steps, mean, std


def load_run_scalars(ablation_dir: str | os.PathLike, cells: Sequence[str] | None = None,
                     tags: Sequence[str] = CURVE_TAGS) -> dict[str, dict[int, dict]]:
    """{cell: {seed: {"step": final step or None, tag: (steps, values), ...}}} for the finished runs (those
    with final_metrics.json). The final step comes from final_metrics.json (`step`)."""
    ablation_dir = Path(ablation_dir)
    if cells is None:
        cells = [c["name"] for c in read_manifest(ablation_dir)["cells"]]
    out: dict = {}
    for cell in cells:
        out[cell] = {}
        for run_dir in sorted((ablation_dir / cell).glob("seed_*")):
            seed, path = _seed_of(run_dir), run_dir / "final_metrics.json"
            if seed is None or not path.exists():
                continue
            try:
                step = json.loads(path.read_text(encoding="utf-8")).get("step")
            except ValueError:
                step = None
            entry: dict = {"step": float(step) if isinstance(step, (int, float)) else None}
            entry.update(load_scalars(run_dir, tags))
            out[cell][seed] = entry
    return out


def curves_of(runs: Mapping[str, Mapping[int, Mapping]], tags: Sequence[str]) -> dict[str, dict[str, list]]:
    """`load_curves`' shape ({cell: {tag: [(steps, values) per seed]}}) from `load_run_scalars`' result."""
    return {cell: {tag: [by_seed[s][tag] for s in sorted(by_seed) if tag in by_seed[s]]
                   for tag in tags if any(tag in r for r in by_seed.values())}
            for cell, by_seed in runs.items()}


# ------------------------------------------------------------------------------ ranking stability
def half_and_full(steps: Sequence[float], values: Sequence[float], max_step: float | None = None
                  ) -> tuple[int, float, int, float]:
    """(half step, value there, full step, value there) of one run's validation series: full is the last
    validation; half the validation whose step is closest to max_step / 2 (the earlier one on a tie), where
    max_step is the run's final step (default: the last logged step)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.size == 0:
        raise ValueError("an empty series has no half or full budget value")
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    last = int(np.flatnonzero(steps == steps[-1])[-1])  # a step logged twice: its last value
    target = (max_step if max_step is not None else steps[-1]) / 2
    half = int(np.argmin(np.abs(steps - target)))
    half = int(np.flatnonzero(steps == steps[half])[-1])
    return int(steps[half]), float(values[half]), int(steps[last]), float(values[last])


def rank_cells(values: Mapping[str, float]) -> dict[str, float]:
    """Rank 1 = highest value; ties share their average rank (scipy's rankdata)."""
    names = list(values)
    ranks = stats.rankdata([-values[c] for c in names], method="average")
    return {c: float(r) for c, r in zip(names, ranks)}


def kendall(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float]:
    """Kendall's tau-b (and its two-sided p-value) between the orderings of the cells both have; nan when
    fewer than two cells or one side is constant."""
    cells = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
    if len(cells) < 2:
        return math.nan, math.nan
    res = stats.kendalltau([a[c] for c in cells], [b[c] for c in cells])
    return float(res.statistic), float(res.pvalue)


def ranking_stability(runs: Mapping[str, Mapping[int, Mapping]], tags: Sequence[str] = RANKING_TAGS) -> list[dict]:
    """Per tag and cell: the mean over seeds at half and at full budget (`half_and_full` of each seed), the
    rank of the cell among the cells at each, and Kendall's tau between the two rankings (same on every
    row of a tag). Rows: tag, cell, n_seeds, half_step, half, half_rank, full_step, full, full_rank,
    kendall_tau, kendall_p. Cells without the tag are left out; a tag no cell logged gives no rows."""
    rows = []
    for tag in tags:
        per_cell = {}
        for cell, by_seed in runs.items():
            points = [half_and_full(*r[tag], r.get("step")) for r in by_seed.values() if tag in r and len(r[tag][0])]
            if points:
                per_cell[cell] = dict(n_seeds=len(points), half_step=float(np.mean([p[0] for p in points])),
                                      half=float(np.mean([p[1] for p in points])),
                                      full_step=float(np.mean([p[2] for p in points])),
                                      full=float(np.mean([p[3] for p in points])))
        if not per_cell:
            continue
        half = {c: v["half"] for c, v in per_cell.items()}
        full = {c: v["full"] for c, v in per_cell.items()}
        half_rank, full_rank = rank_cells(half), rank_cells(full)
        tau, p = kendall(half, full)
        for cell, v in per_cell.items():
            rows.append(dict(tag=tag, cell=cell, **v, half_rank=half_rank[cell], full_rank=full_rank[cell],
                             kendall_tau=tau, kendall_p=p))
    return rows


def _num(x: float, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _rank(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def format_ranking(rows: Sequence[dict]) -> str:
    """The "Ranking at half and full budget" markdown section ("" without rows)."""
    if not rows:
        return ""
    lines = ["## Ranking at half and full budget", "",
             "Cells ranked by the mean over seeds at half budget (each run's validation nearest to half its final "
             "step) and at full budget (its last validation); rank 1 is best. Kendall's τ compares the two "
             "rankings (1: the same order, −1: reversed); a high τ means a half-budget run would have picked "
             "the same winners."]
    for tag in dict.fromkeys(r["tag"] for r in rows):
        part = [r for r in rows if r["tag"] == tag]
        m = _metric(tag)
        unit = " (%)" if m.scale == 100 else ""
        lines += ["", f"### {m.label}{unit}", "",
                  "| cell | seeds | step at half | at half | rank at half | step at full | at full | rank at full |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(part, key=lambda r: (r["full_rank"], r["cell"])):
            lines.append(f"| `{r['cell']}` | {r['n_seeds']} | {r['half_step']:.0f} | {_fmt(r['half'], m)} | "
                         f"{_rank(r['half_rank'])} | {r['full_step']:.0f} | {_fmt(r['full'], m)} | "
                         f"{_rank(r['full_rank'])} |")
        tau, p = part[0]["kendall_tau"], part[0]["kendall_p"]
        lines += ["", f"Kendall's τ = {_num(tau, '.3f')} (p = {_num(p, '.3g')}, {len(part)} cells)."]
    return "\n".join(lines) + "\n"


RANKING_COLUMNS = ("tag", "cell", "n_seeds", "half_step", "half", "half_rank", "full_step", "full", "full_rank",
                   "kendall_tau", "kendall_p")


def ranking_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RANKING_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in RANKING_COLUMNS})
    return buf.getvalue()


# ------------------------------------------------------------------------------------- convergence
def plateau_summary(curves: Mapping[str, Mapping[str, list]], tags: Sequence[str] | None = None,
                    tolerance: float = PLATEAU_TOLERANCE) -> list[dict]:
    """Per tag and cell, from the mean curve over seeds (`mean_band`): the final value, the best value and
    its step, and ``plateau_step``, the first step at which the mean curve is within ``tolerance`` (0.02 =
    2 points of recall) of its final value. Rows: tag, cell, n_seeds, final_step, final, best, best_step,
    plateau_step. Works with any number of seeds per cell (1 gives the seed's own curve)."""
    if tags is None:
        tags = list(dict.fromkeys(t for by_tag in curves.values() for t in by_tag))
    rows = []
    for tag in tags:
        for cell, by_tag in curves.items():
            series = [s for s in by_tag.get(tag) or [] if len(s[0])]
            if not series:
                continue
            steps, mean, _ = mean_band(series)
            final = float(mean[-1])
            best = int(np.argmax(mean))
            within = np.flatnonzero(np.abs(mean - final) <= tolerance + 1e-12)
            rows.append(dict(tag=tag, cell=cell, n_seeds=len(series), final_step=int(steps[-1]), final=final,
                             best=float(mean[best]), best_step=int(steps[best]), plateau_step=int(steps[within[0]])))
    return rows


def format_plateau(rows: Sequence[dict], tolerance: float = PLATEAU_TOLERANCE) -> str:
    """The "Convergence" markdown section: one table per metric ("" without rows)."""
    if not rows:
        return ""
    lines = ["## Convergence", "",
             f"Mean curve over seeds per cell: its final value, its best value (and step), and the first step at "
             f"which it comes within {100 * tolerance:.0f} points of its final value."]
    for tag in dict.fromkeys(r["tag"] for r in rows):
        m = _metric(tag)
        unit = " (%)" if m.scale == 100 else ""
        lines += ["", f"### {m.label}{unit}", "",
                  f"| cell | seeds | final step | final | best | best at step | within {100 * tolerance:.0f} points "
                  "from step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["tag"] == tag):
            lines.append(f"| `{r['cell']}` | {r['n_seeds']} | {r['final_step']} | {_fmt(r['final'], m)} | "
                         f"{_fmt(r['best'], m)} | {r['best_step']} | {r['plateau_step']} |")
    return "\n".join(lines) + "\n"


def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _colors(cells: Sequence[str], baseline: str | None) -> dict[str, object]:
    from matplotlib import colormaps

    others = [c for c in cells if c != baseline]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(others)}
    if baseline:
        colors[baseline] = "black"
    return colors


TAG_LABELS = {"val/t2i/R@1": ("validation t2i R@1 (%)", 100.0), "train/loss": ("training loss", 1.0),
              "val/i2t/R@1": ("validation i2t R@1 (%)", 100.0),
              "val/semantic/t2i/R@1": ("validation semantic t2i R@1 (%)", 100.0),
              "val/semantic/i2t/R@1": ("validation semantic i2t R@1 (%)", 100.0)}


def plot_curves(curves: Mapping[str, Mapping[str, list]], *, baseline: str | None = None, title: str = "",
                tags: Sequence[str] = CURVE_TAGS):
    """One panel per tag, one line per cell (mean over seeds) with a ±1 s.d. band; the baseline in black."""
    fig, axes = _figure(len(tags))
    colors = _colors(list(curves), baseline)
    for ax, tag in zip(axes, tags):
        label, scale = TAG_LABELS.get(tag, (tag, 1.0))
        for cell, by_tag in curves.items():
            if not by_tag.get(tag):
                continue
            steps, mean, std = mean_band(by_tag[tag])
            n = len(by_tag[tag])
            lw = 2.4 if cell == baseline else 1.5
            ax.plot(steps, mean * scale, color=colors[cell], lw=lw, marker="o" if len(steps) < 8 else None, ms=3,
                    label=f"{cell}{' (baseline)' if cell == baseline else ''} (n={n})")
            if n > 1:
                ax.fill_between(steps, (mean - std) * scale, (mean + std) * scale, color=colors[cell], alpha=0.15, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes:
            ax.text(0.5, 0.5, "no TensorBoard scalars found", ha="center", va="center", transform=ax.transAxes)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, band ±1 s.d.")
    return fig


SERIES_RE = re.compile(r"^(?P<series>.+)-(?P<prefix>[a-z]+)(?P<x>\d+)$")
PREFIX_LABELS = {"b": "batch size", "dup": "duplicate rate (%)"}


def _series(cells: Sequence[str]) -> tuple[dict[str, tuple[str, int]], str] | None:
    """cell -> (series, x) when every cell is named `<series>-<prefix><number>` with one prefix and
    several numbers (batch_size: `siglip-b64`; duplicates: `infonce-dup25`), else None."""
    parsed = {c: SERIES_RE.match(c) for c in cells}
    if not cells or not all(parsed.values()):
        return None
    prefixes = {m["prefix"] for m in parsed.values()}
    xs = {int(m["x"]) for m in parsed.values()}
    if len(prefixes) != 1 or len(xs) < 2:
        return None
    prefix = prefixes.pop()
    return {c: (m["series"], int(m["x"])) for c, m in parsed.items()}, PREFIX_LABELS.get(prefix, prefix)


def plot_bars(rows: Sequence[dict], *, title: str = "", keys: Sequence[str] | None = None):
    """R@1 (and the variance correlations where present) per cell with 95% intervals as error bars; the
    baseline's mean as a dashed line. Cells that form series over a number are grouped by that number."""
    if keys is None:
        wanted = ["val/t2i/R@1", "val/i2t/R@1", "val/semantic/t2i/R@1", "variance/text/spearman_specificity",
                  "variance/image/spearman_num_objects"]
        have = set(_keys_of(rows))
        keys = [k for k in wanted if k in have] or ["val/t2i/R@1"]
    fig, axes = _figure(len(keys), width=max(4.5, 0.55 * len(rows) + 2.5) if len(keys) < 3 else 5.0, height=4.6)
    cells = [r["cell"] for r in rows]
    baseline = next((r["cell"] for r in rows if r.get("baseline")), None)
    colors = _colors(cells, baseline)
    grouped = _series(cells)
    for ax, key in zip(axes, keys):
        m = _metric(key)
        mean = np.array([r.get(_col(key, "mean"), np.nan) for r in rows]) * m.scale
        err = np.array([(r[_col(key, "ci_high")] - r[_col(key, "ci_low")]) / 2 if _col(key, "ci_high") in r
                        else 0.0 for r in rows]) * m.scale
        if grouped:
            mapping, xlabel = grouped
            series = list(dict.fromkeys(s for s, _ in mapping.values()))
            xs = sorted({x for _, x in mapping.values()})
            width = 0.8 / len(series)
            scolors = _colors(series, None)
            for j, s in enumerate(series):
                idx = [i for i, c in enumerate(cells) if mapping[c][0] == s]
                pos = [xs.index(mapping[cells[i]][1]) - 0.4 + width * (j + 0.5) for i in idx]
                ax.bar(pos, mean[idx], width, yerr=err[idx], capsize=3, color=scolors[s], label=s)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.legend(fontsize="small", frameon=False)
        else:
            ax.bar(range(len(cells)), mean, 0.7, yerr=err, capsize=3, color=[colors[c] for c in cells])
            ax.set_xticks(range(len(cells)), cells, rotation=35, ha="right", fontsize="small")
            if baseline is not None:
                b = cells.index(baseline)
                if np.isfinite(mean[b]):
                    ax.axhline(mean[b], color="black", ls="--", lw=1, label=f"baseline {baseline}")
                    ax.legend(fontsize="small", frameon=False)
        label = m.label + (" (%)" if m.scale == 100 else "")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, error bars {int(CONFIDENCE * 100)}% t-interval")
    return fig


# ------------------------------------------------------------------------------------------ writing
def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write to `<path>.<pid>.tmp` in the same folder, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write(path, buf.getvalue())


def _machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


# ------------------------------------------------------------------------------ default budget vs plateau
BUDGET_KEYS = ("val/semantic/t2i/R@1", "val/t2i/R@1", "val/semantic/i2t/R@1", "val/i2t/R@1")
BUDGET_TOLERANCE = 0.02  # base.yaml's rule: InfoNCE within 2 points of its own plateau


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean(a) − mean(b) with Welch's t interval (independent samples, unequal variances); no interval
    unless both have two values or more."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) == 0 or len(y) == 0:
        return NAN_INTERVAL
    d = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Interval(d, math.nan, math.nan, min(len(x), len(y)))
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Interval(d, d, d, min(len(x), len(y)))
    dof = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * se)
    return Interval(d, d - half, d + half, min(len(x), len(y)))


def budget_gaps(plateau: Mapping[str, Mapping[int, Mapping[str, float]]],
                default: Mapping[str, Mapping[int, Mapping[str, float]]],
                keys: Sequence[str] = BUDGET_KEYS) -> list[dict]:
    """Per cell present in both: the default-budget runs' final value, the long runs' final value (the
    plateau) and plateau − default with Welch's interval, per key."""
    rows = []
    for cell in plateau:
        if cell not in default or not plateau[cell] or not default[cell]:
            continue
        row: dict = {"cell": cell}
        for key in keys:
            p = [m[key] for m in plateau[cell].values() if key in m]
            d = [m[key] for m in default[cell].values() if key in m]
            if p and d:
                row[key] = (t_interval(d), t_interval(p), welch_difference(p, d))
        rows.append(row)
    return rows


def format_budget(rows: Sequence[dict], default_name: str, keys: Sequence[str] = BUDGET_KEYS,
                  tolerance: float = BUDGET_TOLERANCE) -> str:
    if not rows:
        return ""

    def iv(i: Interval) -> str:
        if not math.isfinite(i.mean):
            return ""
        return f"{100 * i.mean:.1f}" + (f" ± {100 * i.half_width:.1f}" if math.isfinite(i.half_width) else "")

    def gap(i: Interval) -> str:
        text = f"{100 * i.mean:+.1f}"
        return text + (f" [{100 * i.low:.1f}, {100 * i.high:.1f}]" if math.isfinite(i.low) else "")

    out = [f"## Default budget vs plateau",
           "",
           f"Final values of the default-budget runs (`runs/{default_name}`) against the same family's runs at "
           f"this study's budget (the plateau); gap = plateau − default, Welch's 95% interval where both have "
           f"two seeds or more. base.yaml's rule: InfoNCE's gap at most {100 * tolerance:.0f} points.",
           "",
           "| cell | " + " | ".join(f"{_metric(k).label} default | plateau | gap" for k in keys) + " |",
           "|---|" + "---:|---:|---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            if k in r:
                d, p, g = r[k]
                cells += [iv(d), iv(p), gap(g)]
            else:
                cells += ["", "", ""]
        out.append(f"| `{r['cell']}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(ablation: str, runs_dir: str | os.PathLike = "runs", results_dir: str | os.PathLike = "results",
                 *, plots: bool = True, curve_tags: Sequence[str] | None = None) -> dict[str, Path]:
    """Everything for one ablation; returns {kind: path} of what it wrote. ``curve_tags``: the panels of the
    curves plot (default CURVE_TAGS; CONVERGENCE_TAGS for the ablation named `convergence`, which also gets
    the plateau table)."""
    ablation_dir = Path(runs_dir) / ablation
    if not ablation_dir.is_dir():
        raise FileNotFoundError(f"no runs for ablation '{ablation}': {ablation_dir} does not exist")
    manifest = read_manifest(ablation_dir)
    cells = [c["name"] for c in manifest["cells"]]
    metrics = load_metrics(ablation_dir, cells)
    if not any(metrics.values()):
        raise FileNotFoundError(f"no finished run under {ablation_dir} (no */seed_*/final_metrics.json)")
    rows = summarize(metrics, manifest.get("baseline"), {c["name"]: c.get("description", "") for c in manifest["cells"]})
    results_dir = Path(results_dir)
    convergence = ablation == "convergence"
    if curve_tags is None:
        curve_tags = CONVERGENCE_TAGS if convergence else CURVE_TAGS
    curve_tags = tuple(curve_tags)
    # one pass over the event files for the ranking, the plateau table and the curves
    runs = load_run_scalars(ablation_dir, cells, tuple(dict.fromkeys((*curve_tags, *RANKING_TAGS))))
    ranking = ranking_stability(runs)
    curves = curves_of(runs, curve_tags)
    stamp = f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} on {_machine()}."
    sections = [format_plateau(plateau_summary(curves, curve_tags)) if convergence else "", format_ranking(ranking)]
    default_dir = Path(runs_dir) / "losses"
    if convergence and default_dir.is_dir():
        # the convergence cells are the `losses` cells at twice the budget: how far is each from its plateau?
        default = load_metrics(default_dir, [c for c in cells if (default_dir / c).is_dir()])
        sections.insert(1, format_budget(budget_gaps(metrics, default), "losses"))
    md = format_markdown(rows, ablation, source=ablation_dir.as_posix(), stamp=stamp,
                         series=series_differences(metrics, manifest.get("baseline")), sections=sections)
    written = {
        "csv": atomic_write(results_dir / f"{ablation}.csv", to_csv(rows)),
        "md": atomic_write(results_dir / f"{ablation}.md", md),
    }
    if ranking:
        written["ranking"] = atomic_write(results_dir / f"{ablation}_ranking.csv", ranking_csv(ranking))
    if plots:
        written["bars"] = save_figure(plot_bars(rows, title=ablation), results_dir / f"{ablation}_bars.png")
        if any(curves.values()):
            written["curves"] = save_figure(plot_curves(curves, baseline=manifest.get("baseline"), title=ablation,
                                                        tags=curve_tags),
                                            results_dir / f"{ablation}_curves.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.report", description=__doc__.split("\n")[0])
    p.add_argument("--ablation", nargs="+", metavar="NAME", help="default: every folder of --runs-dir with runs")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--curve-tags", nargs="+", metavar="TAG", default=None,
                   help=f"scalar tags of the curves plot, one panel each (default {' '.join(CURVE_TAGS)}; for the "
                        f"`convergence` ablation {' '.join(CONVERGENCE_TAGS)})")
    a = p.parse_args(argv)
    names = a.ablation or sorted(d.name for d in a.runs_dir.glob("*") if d.is_dir() and list(d.glob("*/seed_*")))
    if not names:
        p.error(f"no ablation runs under {a.runs_dir}")
    for name in names:
        written = write_report(name, a.runs_dir, a.results_dir, plots=not a.no_plots, curve_tags=a.curve_tags)
        print(f"{name}: wrote " + ", ".join(str(x) for x in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
