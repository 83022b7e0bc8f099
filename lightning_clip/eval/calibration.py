"""Calibration of per-sample predicted variance: does a larger predicted log-std go with worse retrieval?

- `spearman`: rank correlation of the predicted log-std with a ground-truth attribute (caption
  specificity, object count), unknowns marked -1 left out.
- `recall_at_1_by_bin`: R@1 of the queries in each equal-count bin of the predicted uncertainty.
- `sparsification_curve` / `oracle_curve` / `ause`: the sparsification protocol of Ilg et al.,
  "Uncertainty Estimates and Multi-Hypotheses Networks for Optical Flow", ECCV 2018 (Sec. 5): remove the
  queries the model is least sure of first and follow the mean error of the rest; the oracle removes
  them by their true error. AUSE, the area between the two curves, is 0 for an uncertainty that orders
  the queries exactly as their errors do.

The per-query error is whatever the caller passes; `retrieval_error` gives the default used for
retrieval, ``1 - hit@1`` (1 when the correct item is not ranked first). It is binary, so the oracle
curve reaches 0 as soon as the misses are removed; a graded error (e.g. ``log(rank)``) separates models
that miss by a little from those that miss by a lot.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

DEFAULT_FRACTIONS = tuple(k / 10 for k in range(10))  # 0, 0.1, ..., 0.9: never remove every query


def spearman(x: Tensor, y: Tensor) -> Optional[Tensor]:
    """Spearman's rho over the pairs where ``y >= 0`` (-1 marks unknown); None when undefined (fewer than
    two pairs, or one side constant)."""
    from torchmetrics.functional import spearman_corrcoef

    keep = y >= 0
    x, y = x[keep].float(), y[keep].float()
    if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return None
    return spearman_corrcoef(x, y)


def recall_at_1_by_bin(values: Tensor, ranks: Tensor, bins: int = 10) -> dict[int, float]:
    """R@1 (share of ``ranks <= 1``; ranks are 1-based ranks of the correct item) of the items in each
    equal-count bin of ``values``: bin b (1-based, 1 = smallest values) holds the items of sorted
    position p with ``p * bins // n == b - 1``. Ties keep input order (stable sort). Bins left empty
    (fewer items than bins) are left out."""
    if values.shape != ranks.shape or values.dim() != 1:
        raise ValueError(f"expected two 1-d tensors of the same length, got {tuple(values.shape)} and "
                         f"{tuple(ranks.shape)}")
    order = torch.argsort(values, stable=True)
    bin_of = torch.empty_like(order)
    bin_of[order] = torch.arange(values.numel(), device=values.device) * bins // max(values.numel(), 1)
    hit = (ranks <= 1).double()
    return {int(b) + 1: float(hit[bin_of == b].mean()) for b in torch.unique(bin_of)}


def retrieval_error(ranks: Tensor) -> Tensor:
    """The default per-query error: ``1 - hit@1`` = 1.0 where the 1-based rank of the correct item is
    above 1, else 0.0."""
    return (ranks > 1).double()


def _fractions(fractions: Optional[Sequence[float]]) -> Tensor:
    f = torch.tensor(DEFAULT_FRACTIONS if fractions is None else list(fractions), dtype=torch.float64)
    if f.numel() == 0 or bool((f < 0).any()) or bool((f >= 1).any()) or bool((f.diff() <= 0).any()):
        raise ValueError(f"fractions must be increasing values in [0, 1), got {f.tolist()}")
    return f


def _removal_curve(score: Tensor, error: Tensor, fractions: Tensor) -> Tensor:
    """Mean error of the queries left after removing ``f * n`` of them, highest ``score`` first.

    Ties are resolved by expectation rather than by position: when the cut falls inside a group of
    equal scores, every member of the group is removed by the same share (so the result equals the
    average over all orders of the tied queries). This keeps the curve independent of the input order
    and treats a constant uncertainty as uninformative: its curve is flat at the mean error. The removed
    count ``f * n`` need not be an integer, for the same reason."""
    if score.shape != error.shape or score.dim() != 1 or score.numel() == 0:
        raise ValueError(f"expected two non-empty 1-d tensors of the same length, got {tuple(score.shape)} "
                         f"and {tuple(error.shape)}")
    n = score.numel()
    score, error = score.detach().double().cpu(), error.detach().double().cpu()
    order = torch.argsort(score, descending=True, stable=True)
    score, error = score[order], error[order]
    # Each query's tie group in the sorted order: where it starts and how many it holds.
    _, counts = torch.unique_consecutive(score, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    start = starts.repeat_interleave(counts).double()
    size = counts.repeat_interleave(counts).double()
    removed_count = fractions[:, None] * n                                    # [F, 1]
    removed = ((removed_count - start) / size).clamp(0.0, 1.0)               # [F, n] share of each query removed
    return (error.sum() - removed @ error) / (n - fractions * n)


def sparsification_curve(uncertainty: Tensor, error: Tensor,
                         fractions: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
    """``(fractions, curve)``: ``curve[k]`` is the mean ``error`` of the queries left after removing the
    share ``fractions[k]`` with the highest ``uncertainty`` (default fractions 0, 0.1, ..., 0.9).
    Float64 tensors; ties as in `_removal_curve`."""
    f = _fractions(fractions)
    return f, _removal_curve(uncertainty, error, f)


def oracle_curve(error: Tensor, fractions: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
    """The best possible sparsification curve: queries removed by their true error, largest first."""
    f = _fractions(fractions)
    return f, _removal_curve(error, error, f)


def ause(uncertainty: Tensor, error: Tensor, fractions: Optional[Sequence[float]] = None) -> float:
    """Area Under the Sparsification Error (Ilg et al. 2018): ``integral (curve - oracle) df`` by the
    trapezoid rule over ``fractions``, with the fraction removed (in [0, 1)) on the x-axis rather than a
    count of queries, so values compare across set sizes. >= 0; 0 when ``uncertainty`` orders the queries
    as ``error`` does. Unnormalised error (the curves are not divided by the mean error)."""
    f, curve = sparsification_curve(uncertainty, error, fractions)
    _, best = oracle_curve(error, fractions)
    return float(torch.trapezoid(curve - best, f))
