"""The per-cell table: its rows (mean and interval over seeds, paired differences), the CSV both tables are
written with, and the markdown of results/<ablation>.md."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np

from .columns import (BAYES_CEILING_KEYS, BY_KEY, CEILING_KEYS, METRICS, ORACLE_CEILING_KEYS, col, fmt, metric,
                      series_of)
from .stats import CONFIDENCE, Interval, paired_difference, t_interval

Metrics = Mapping[str, Mapping[int, Mapping[str, float]]]  # {cell: {seed: {key: value}}}


def present_keys(metrics: Metrics) -> list[str]:
    """Known keys in table order, then any other numeric key (sorted), that some run logged."""
    seen = {k for seeds in metrics.values() for m in seeds.values() for k in m}
    return [m.key for m in METRICS if m.key in seen] + sorted(seen - set(BY_KEY) - {"epoch"})


def _diff_columns(key: str, d: Interval) -> dict:
    return {col(key, "diff"): d.mean, col(key, "diff_ci_low"): d.low, col(key, "diff_ci_high"): d.high,
            col(key, "diff_n"): d.n, col(key, "diff_sig"): int(d.excludes_zero)}


def summarize(metrics: Metrics, baseline: str | None, descriptions: Mapping[str, str] | None = None) -> list[dict]:
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
            row.update({col(key, "mean"): iv.mean, col(key, "ci_low"): iv.low, col(key, "ci_high"): iv.high,
                        col(key, "n"): iv.n})
            base_values = {s: m[key] for s, m in base.items() if key in m}
            if baseline and cell != baseline and base_values:
                d = paired_difference(values, base_values)
                if d.n:
                    row.update(_diff_columns(key, d))
        rows.append(row)
    return rows


def series_differences(metrics: Metrics, baseline: str | None) -> list[dict]:
    """For a series ablation (cells `<series>-<prefix><number>`, see `series_of`): each cell minus the
    baseline series' cell *at the same number*, paired by seed (`siglip-b16` − `infonce-b16`). The table
    against the single baseline cell mixes the series effect with the number's; this one isolates the series
    effect. Rows carry ``cell``, ``versus`` and the `summarize` diff columns of the compared keys; [] otherwise."""
    parsed = series_of(list(metrics))
    if not baseline or parsed is None or baseline not in parsed[0]:
        return []
    where, _ = parsed
    base_series = where[baseline][0]
    by_point = {point: cell for cell, point in where.items()}
    keys = [k for k in present_keys(metrics) if metric(k).compare]
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
                row.update(_diff_columns(key, d))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- CSV
def csv_columns(rows: Sequence[dict]) -> list[str]:
    """The summary table's columns: the cell's, then each metric's group in table order."""
    head = ["cell", "description", "baseline", "n_seeds"]
    rest = []
    for row in rows:
        rest += [k for k in row if k not in head and k not in rest]
    order = {k: i for i, k in enumerate(BY_KEY)}
    return head + sorted(rest, key=lambda c: (order.get(c.rsplit(" ", 1)[0], len(order)), c.rsplit(" ", 1)[0],
                                              rest.index(c)))


def write_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV text of ``rows`` in ``columns``: floats in full precision (repr), NaN and missing values blank."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else (repr(v) if isinstance(v, float) else v))
                    for k, v in row.items()})
    return buf.getvalue()


def to_csv(rows: Sequence[dict]) -> str:
    return write_csv(rows, csv_columns(rows))


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


# ------------------------------------------------------------------------------------------ markdown
def keys_of(rows: Sequence[dict], what: str = "mean") -> list[str]:
    """The metric keys that have a `<key> <what>` column in some row, in table order."""
    keys = []
    for row in rows:
        for c in row:
            key, _, suffix = c.rpartition(" ")
            if suffix == what and key not in keys:
                keys.append(key)
    order = list(BY_KEY)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def _diff_cells(r: Mapping, keys: Sequence[str]) -> list[str]:
    """`+1.2 [0.3, 2.1]` per key from a row's diff columns, bold where the interval excludes zero."""
    cells = []
    for k in keys:
        m, d = metric(k), r.get(col(k, "diff"))
        if d is None:
            cells.append("")
            continue
        text = f"{fmt(d, m):s}" if d < 0 else f"+{fmt(d, m)}"
        if r.get(col(k, "diff_n"), 0) >= 2:
            text += f" [{fmt(r[col(k, 'diff_ci_low')], m)}, {fmt(r[col(k, 'diff_ci_high')], m)}]"
        cells.append(f"**{text}**" if r.get(col(k, "diff_sig")) else text)
    return cells


def format_markdown(rows: Sequence[dict], ablation: str, *, confidence: float = CONFIDENCE,
                    source: str | None = None, stamp: str | None = None,
                    series: Sequence[dict] | None = None, sections: Sequence[str] = ()) -> str:
    """The results/<ablation>.md text: the table of means ± half-widths, then the paired differences from
    the baseline, then (``series``, from `series_differences`) those at the same setting, then ``sections``.
    Only the METRICS columns; the CSV carries every numeric key of final_metrics.json. The oracle and Bayes
    ceilings are a line each under the table when every cell has the same (the same validation world), else
    columns; runs logged before the Bayes ceiling existed get the oracle's line only."""
    keys = [k for k in keys_of(rows) if k in BY_KEY]
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
    lines += ["", "| cell | seeds | " + " | ".join(metric(k).label for k in keys) + " |",
              "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            m, mean = metric(k), r.get(col(k, "mean"))
            if mean is None:
                cells.append("")
            elif r.get(col(k, "n"), 0) >= 2:
                cells.append(f"{fmt(mean, m)} ± {fmt((r[col(k, 'ci_high')] - r[col(k, 'ci_low')]) / 2, m)}")
            else:
                cells.append(fmt(mean, m))
        name = f"`{r['cell']}`" + (" (baseline)" if r.get("baseline") else "")
        lines.append(f"| {name} | {r.get('n_seeds', 0)} | " + " | ".join(cells) + " |")
    for keys_, text in ((ORACLE_CEILING_KEYS, "Oracle ceiling (expected R@1 of a perfect scorer with random "
                                              "tie-breaking): "),
                        (BAYES_CEILING_KEYS, "Bayes ceiling (expected R@1 of ranking by the caption generator's "
                                             "own likelihood P(caption | image)): ")):
        if any(k in (ceiling or {}) for k in keys_):
            lines += ["", text + ", ".join(f"{d} {100 * ceiling[k]:.1f}%" for d, k in zip(("t2i", "i2t"), keys_)
                                           if k in ceiling) + "."]

    diff_keys = [k for k in keys_of(rows, "diff") if metric(k).compare]
    if baseline and diff_keys:
        lines += ["", f"## Difference from `{baseline}`, paired by seed", "",
                  f"cell − baseline on the seeds both ran: mean [{pct}% interval]; **bold** where the interval "
                  "excludes zero.", "",
                  "| cell | " + " | ".join(metric(k).label for k in diff_keys) + " |",
                  "|---|" + "---:|" * len(diff_keys)]
        lines += [f"| `{r['cell']}` | " + " | ".join(_diff_cells(r, diff_keys)) + " |"
                  for r in rows if not r.get("baseline")]

    series_keys = [k for k in keys_of(series or [], "diff") if metric(k).compare]
    if series_keys:
        lines += ["", "## Difference at the same setting, paired by seed", "",
                  f"Each cell minus the baseline series' cell with the same number: mean [{pct}% interval]; "
                  "**bold** where the interval excludes zero.", "",
                  "| cell | versus | " + " | ".join(metric(k).label for k in series_keys) + " |",
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
        values = [r[col(key, "mean")] for r in rows if r.get(col(key, "mean")) is not None
                  and math.isfinite(r[col(key, "mean")])]
        if not values:
            continue
        if max(values) - min(values) > tol:
            return None
        out[key] = float(np.mean(values))
    return out
