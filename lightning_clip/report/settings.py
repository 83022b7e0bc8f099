"""What an ablation asks of its report, declared in its manifest (runs/<ablation>/ablation.json, written by
the runner) under ``"report"``, so that no ablation name is special here:

    "report": {"curve_tags": ["val/t2i/R@1", ...] | null,   the curves plot's panels (null: CURVE_TAGS)
               "plateau": true | false,                      the "Convergence" table from those curves
               "budget_against": "losses" | null,           the "Default budget vs plateau" table against
                                                             runs/<that ablation> (same runs folder)
               "pairs": [["A", "B"], ...] | null}            on the test protocol, A − B paired by seed for
                                                             two cells neither of which is the baseline

A missing key, or null, is the default for that setting.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

#: the curves plot's panels unless the ablation declares others
CURVE_TAGS = ("val/t2i/R@1", "train/loss")


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    curve_tags: tuple[str, ...] = CURVE_TAGS
    plateau: bool = False
    budget_against: str | None = None
    pairs: tuple[tuple[str, str], ...] = ()


def settings_of(manifest: Mapping) -> ReportSettings:
    """The manifest's ``report`` entry; a value of the wrong type is an error that names the key (a typo'd
    manifest should not silently lose its tables)."""
    declared = manifest.get("report") or {}
    if not isinstance(declared, Mapping):
        raise ValueError(f"ablation.json: 'report' must be an object, not {declared!r}")
    unknown = set(declared) - {f.name for f in dataclasses.fields(ReportSettings)}
    if unknown:
        raise ValueError(f"ablation.json: unknown 'report' keys {sorted(unknown)}")
    tags = declared.get("curve_tags")
    if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags) or not tags):
        raise ValueError(f"ablation.json: report.curve_tags must be a non-empty list of tags, not {tags!r}")
    plateau = declared.get("plateau")
    if plateau is not None and not isinstance(plateau, bool):
        raise ValueError(f"ablation.json: report.plateau must be true or false, not {plateau!r}")
    against = declared.get("budget_against")
    if against is not None and (not isinstance(against, str) or not against):
        raise ValueError(f"ablation.json: report.budget_against must be an ablation name, not {against!r}")
    pairs = declared.get("pairs") or []
    if isinstance(pairs, str) or not all(isinstance(q, (list, tuple)) and len(q) == 2 and all(
            isinstance(c, str) and c for c in q) and q[0] != q[1] for q in pairs):
        raise ValueError(f"ablation.json: report.pairs must be a list of [cell, other cell], not {pairs!r}")
    return ReportSettings(curve_tags=tuple(tags) if tags is not None else CURVE_TAGS, plateau=bool(plateau),
                          budget_against=against, pairs=tuple(tuple(q) for q in pairs))
