"""CLIP_benchmark-style result records and their flat ``eval/...`` scalar names (no heavy imports: the
report reads these without loading models)."""
from __future__ import annotations

import json
from pathlib import Path

#: the measures the ablation tables show
TABLE_KEYS = ("eval/zeroshot_classification/color_shape/top1", "eval/linear_probe/color_shape/top1",
              "eval/embedding_geometry/modality_gap", "eval/embedding_geometry/uniformity_image")
_PER_ATTRIBUTE = ("zeroshot_classification", "linear_probe")


def record(dataset: str, task: str, metrics: dict, model: str = "", pretrained: str = "") -> dict:
    """One result in CLIP_benchmark's layout (its `--output` JSON)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": {k: float(v) for k, v in metrics.items()}, "language": "en"}


def flatten(records: list[dict]) -> dict[str, float]:
    """``eval/<task>/<metric>``, with the attribute after the task for per-attribute tasks (their dataset
    is ``<split>/<attribute>``)."""
    out = {}
    for r in records:
        attr = r["dataset"].rsplit("/", 1)[-1] if r["task"] in _PER_ATTRIBUTE and "/" in r["dataset"] else ""
        prefix = f"eval/{r['task']}/" + (f"{attr}/" if attr else "")
        out.update({prefix + k: float(v) for k, v in r["metrics"].items()})
    return out


def read_flat(path: Path) -> dict[str, float]:
    """The flat scalars of an eval.json; an unreadable file names itself."""
    try:
        return flatten(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an eval.json of CLIP_benchmark-style records ({e})") from None
