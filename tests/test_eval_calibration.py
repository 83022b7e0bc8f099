"""Calibration measures against hand-computed answers."""
from __future__ import annotations

import pytest
import torch

from lightning_clip.eval.calibration import (DEFAULT_FRACTIONS, ause, oracle_curve, recall_at_1_by_bin,
                                            retrieval_error, sparsification_curve)


def test_recall_at_1_by_bin_known_values():
    values = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    ranks = torch.tensor([1, 1, 4, 1, 2, 3])
    # sorted by value: 0.1 (hit), 0.2 (miss), 0.3 (hit), 0.5 (hit), 0.7 (miss), 0.9 (miss)
    assert recall_at_1_by_bin(values, ranks, bins=3) == {1: 0.5, 2: 1.0, 3: 0.0}
    assert recall_at_1_by_bin(values, ranks, bins=2) == {1: pytest.approx(2 / 3), 2: pytest.approx(1 / 3)}
    out = recall_at_1_by_bin(values, ranks, bins=10)  # more bins than items: empty bins left out
    assert len(out) == 6 and all(isinstance(v, float) for v in out.values())


def test_recall_at_1_by_bin_ties_keep_input_order():
    out = recall_at_1_by_bin(torch.zeros(4), torch.tensor([1, 1, 5, 5]), bins=2)
    assert out == {1: 1.0, 2: 0.0}


def test_retrieval_error():
    assert retrieval_error(torch.tensor([1, 2, 1, 7])).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_curves_known_values():
    error = torch.tensor([1.0] * 5 + [0.0] * 5)
    f, oracle = oracle_curve(error)
    assert f.tolist() == pytest.approx(list(DEFAULT_FRACTIONS))
    # removing m = 10 f of the misses first: max(5 - m, 0) / (10 - m)
    assert oracle.tolist() == pytest.approx([max(5 - m, 0) / (10 - m) for m in range(10)])
    # uncertainty highest on the hits: the hits go first, 5 / (10 - m) until they are gone
    _, worst = sparsification_curve(-error, error)
    assert worst.tolist() == pytest.approx([5 / (10 - m) if m <= 5 else 1.0 for m in range(10)])


def test_ause_zero_for_perfect_ordering_and_known_for_reversed():
    error = torch.tensor([1.0] * 5 + [0.0] * 5)
    assert ause(error, error) == pytest.approx(0.0, abs=1e-12)
    assert ause(2 * error + 3, error) == pytest.approx(0.0, abs=1e-12)  # only the ordering matters
    # graded errors: uncertainty in the same order -> 0 as well
    graded = torch.tensor([0.3, 2.0, 0.0, 1.1, 0.7])
    assert ause(graded.exp(), graded) == pytest.approx(0.0, abs=1e-12)
    fractions = list(DEFAULT_FRACTIONS)
    gap = [5 / (10 - m) if m <= 5 else 1.0 for m in range(10)]
    gap = [w - max(5 - m, 0) / (10 - m) for m, w in enumerate(gap)]
    expected = sum((a + b) / 2 * (x1 - x0) for a, b, x0, x1 in zip(gap, gap[1:], fractions, fractions[1:]))
    assert ause(-error, error) == pytest.approx(expected)
    assert expected > 0.5  # the reversed ordering is far from the oracle


def test_ties_are_resolved_by_expectation():
    # constant uncertainty: uninformative, the curve is flat at the mean error whatever the input order
    error = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    _, curve = sparsification_curve(torch.zeros(5), error)
    assert torch.allclose(curve, torch.full((10,), 0.4, dtype=torch.float64))
    _, curve_flipped = sparsification_curve(torch.zeros(5), error.flip(0))
    assert torch.equal(curve, curve_flipped)
    # a cut inside a tie group removes the same share of each member: remove 2 of 4, the first (score 2)
    # whole, then half of each of the two tied at 1 (errors 1 and 0) -> left error (2 - 1.5) / 2
    _, curve = sparsification_curve(torch.tensor([2.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]),
                                    fractions=[0.0, 0.5])
    assert curve.tolist() == pytest.approx([0.5, 0.25])


def test_fractions_are_validated():
    error = torch.tensor([1.0, 0.0])
    for bad in ([0.0, 1.0], [0.5, 0.2], [-0.1], []):
        with pytest.raises(ValueError):
            sparsification_curve(error, error, bad)
    with pytest.raises(ValueError):
        sparsification_curve(torch.zeros(3), torch.zeros(2))
