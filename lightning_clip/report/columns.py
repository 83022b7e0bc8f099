"""What the tables show of each metric key (label, scale, digits, whether it is compared with the baseline),
and how cells named after a series and a number (`siglip-b64`) are recognised."""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence


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
    Metric("val/bayes/t2i/R@1", "Bayes t2i R@1", 100, 1),
    Metric("val/bayes/i2t/R@1", "Bayes i2t R@1", 100, 1),
    Metric("train/false_negatives", "FN share", 100, 1),
    Metric("variance/text/spearman_specificity", "ρ(text var, specificity)", 1, 3, True),
    Metric("variance/image/spearman_num_objects", "ρ(image var, objects)", 1, 3, True),
    # meru's answer to the same question (vaguer captions nearer the origin: positive), beside the variance ρ
    Metric("hyperbolic/text/spearman_specificity", "ρ(text origin dist, specificity)", 1, 3, True),
    # does the predicted variance say which queries fail? R@1 of the most / least certain tenth of the
    # caption queries, and AUSE (0 = the log-std orders the misses perfectly) from the evaluation suite
    Metric("variance/text/R@1_decile_1", "t2i R@1, lowest text var decile", 100, 1),
    Metric("variance/text/R@1_decile_10", "t2i R@1, highest text var decile", 100, 1),
    Metric("eval/variance_calibration/text_ause", "AUSE (text)", 1, 3, True),
    Metric("eval/variance_calibration/image_ause", "AUSE (image)", 1, 3, True),
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
#: the oracle and Bayes ceiling keys (logged by the retrieval callback on the synthetic world; runs from
#: before the Bayes ceiling have only the oracle's)
ORACLE_CEILING_KEYS = ("val/ceiling/t2i/R@1", "val/ceiling/i2t/R@1")
BAYES_CEILING_KEYS = ("val/bayes/t2i/R@1", "val/bayes/i2t/R@1")
CEILING_KEYS = ORACLE_CEILING_KEYS + BAYES_CEILING_KEYS


def metric(key: str) -> Metric:
    """The known column of ``key``, else a plain one labelled with the key itself."""
    return BY_KEY.get(key) or Metric(key, key)


def fmt(x: float, m: Metric) -> str:
    return f"{x * m.scale:.{m.digits}f}"


def col(key: str, what: str) -> str:
    """A CSV column: `<key> mean`, `<key> ci_low`, `<key> diff`, ..."""
    return f"{key} {what}"


def unit(m: Metric) -> str:
    return " (%)" if m.scale == 100 else ""


SERIES_RE = re.compile(r"^(?P<series>.+)-(?P<prefix>[a-z]+)(?P<x>\d+)$")
PREFIX_LABELS = {"b": "batch size", "dup": "duplicate rate (%)"}


def series_of(cells: Sequence[str]) -> tuple[dict[str, tuple[str, int]], str] | None:
    """cell -> (series, x) and the x axis' label when every cell is named `<series>-<prefix><number>` with one
    prefix and several numbers (batch_size: `siglip-b64`; duplicates: `infonce-dup25`), else None."""
    parsed = {c: SERIES_RE.match(c) for c in cells}
    if not cells or not all(parsed.values()):
        return None
    prefixes = {m["prefix"] for m in parsed.values()}
    xs = {int(m["x"]) for m in parsed.values()}
    if len(prefixes) != 1 or len(xs) < 2:
        return None
    prefix = prefixes.pop()
    return {c: (m["series"], int(m["x"])) for c, m in parsed.items()}, PREFIX_LABELS.get(prefix, prefix)
