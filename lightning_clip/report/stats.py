"""Intervals over seeds, differences between cells, and rankings: the numbers behind every table."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


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


# -- many comparisons at once: the confirm stage's table ---------------------------------------------------
def paired_p(cell: Mapping[int, float], baseline: Mapping[int, float]) -> float:
    """Two-sided paired t-test p-value of cell − baseline over the seeds both have (NaN with fewer than
    two; a constant nonzero difference is p = 0, a constant zero p = 1)."""
    d = np.asarray([cell[s] - baseline[s] for s in sorted(set(cell) & set(baseline))], dtype=float)
    if len(d) < 2:
        return math.nan
    if float(d.std(ddof=1)) == 0.0:
        return 0.0 if float(d.mean()) != 0.0 else 1.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: the k-th smallest of m p-values times (m − k + 1), made monotone and
    capped at 1. It keeps the family-wise error rate at the level used, for any dependence between tests."""
    finite = sorted(((p, k) for k, p in pvalues.items() if math.isfinite(p)))
    m, running, out = len(finite), 0.0, {k: math.nan for k in pvalues}
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def tost(cell: Mapping[int, float], baseline: Mapping[int, float], margin: float) -> float:
    """Two one-sided paired t-tests of |cell − baseline| < margin: the larger of the two p-values (NaN
    with fewer than two seeds). Below the level, the two are equivalent within the margin."""
    d = np.asarray([cell[s] - baseline[s] for s in sorted(set(cell) & set(baseline))], dtype=float)
    if len(d) < 2:
        return math.nan
    if float(d.std(ddof=1)) == 0.0:
        return 0.0 if abs(float(d.mean())) < margin else 1.0
    above = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(above, below))


def verdict(interval: Interval, p_diff: float, p_equiv: float, margin: float, alpha: float = 0.05,
            words: tuple[str, str] = ("above", "below")) -> str:
    """A comparison's verdict, beside the Bonferroni interval printed with it: ``words`` (up, down) only
    where Holm rejects at ``alpha`` *and* that interval excludes 0 (Holm's step-down can reject where the
    Bonferroni interval still holds 0, and a verdict must not contradict its interval); "equivalent (±m)"
    where the Holm-adjusted TOST rejects a difference of ``margin`` or more; else "undecided"; "" with
    fewer than two seeds."""
    if interval.n < 2:
        return ""
    if p_diff < alpha and (interval.low > 0 or interval.high < 0):
        return words[0] if interval.mean > 0 else words[1]
    if p_equiv < alpha:
        return f"equivalent (±{margin:g})"
    return "undecided"
