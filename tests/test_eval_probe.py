"""Linear probe on constructed features: separable classes, a case where C matters, unseen classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_clip.eval.probe import linear_probe


def blobs(n_per_class: int, centres: np.ndarray, rng: np.random.Generator, scale: float = 0.3):
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return centres[y] + rng.normal(scale=scale, size=(len(y), centres.shape[1])), y


def test_linearly_separable_is_perfect():
    rng = np.random.default_rng(0)
    centres = 5.0 * np.eye(4, 6)
    train, test = blobs(30, centres, rng), blobs(10, centres, rng)
    out = linear_probe(*train, *test)
    assert out["top1"] == 1.0 and out["mean_per_class"] == 1.0
    assert out["C"] == 0.01  # every C is perfect on validation: ties go to the strongest regularisation


def correlated_noise(n: int, rng: np.random.Generator):
    """Three classes along a direction drowned in a large noise z, which a second feature measures
    alone: the separating direction is x0 - x1. Strong L2 keeps the weights near the class-mean
    difference (x0 only, noise included); weak L2 lets the probe cancel z."""
    y = np.arange(n) % 3
    z = rng.normal(scale=10.0, size=n)
    s = 2.0 * y + rng.normal(scale=0.3, size=n)
    return np.stack([s + z, z, rng.normal(size=n)], 1), y


def test_regularisation_choice_matters_and_is_chosen_on_validation():
    rng = np.random.default_rng(0)
    train, test = correlated_noise(300, rng), correlated_noise(600, rng)
    strong = linear_probe(*train, *test, Cs=(0.01,))
    assert strong["C"] == 0.01 and strong["top1"] < 0.6
    out = linear_probe(*train, *test)
    assert out["C"] >= 10 and out["top1"] > 0.99


def test_classes_only_in_test_count_as_errors():
    rng = np.random.default_rng(1)
    centres = 5.0 * np.eye(3)
    train_x, train_y = blobs(20, centres[:2], rng)
    test_x, test_y = blobs(10, centres[:2], rng)
    extra_x, _ = blobs(5, centres[2:], rng)
    out = linear_probe(train_x, train_y, np.concatenate([test_x, extra_x]),
                       np.concatenate([test_y, np.full(5, 2)]))
    assert out["top1"] == pytest.approx(20 / 25)
    assert out["mean_per_class"] == pytest.approx((1 + 1 + 0) / 3)


def test_tensors_seeds_and_unstratifiable_splits():
    rng = np.random.default_rng(2)
    x, y = blobs(12, 4.0 * np.eye(3), rng, scale=2.0)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y)
    a = linear_probe(tx, ty, tx, ty, seed=3)
    assert a == linear_probe(tx, ty, tx, ty, seed=3)  # deterministic
    b = linear_probe(x, y, x, y, seed=3)  # float64 arrays: the same choice, predictions up to rounding
    assert b["C"] == a["C"] and b["top1"] == pytest.approx(a["top1"], abs=0.03)
    # a class with a single member cannot be stratified: the split falls back to a plain seeded one
    y1 = y.copy()
    y1[0] = 3
    out = linear_probe(x, y1, x, y1)
    assert 0.0 <= out["top1"] <= 1.0


def test_single_class_training_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(np.zeros((4, 2)), np.zeros(4, dtype=int), np.zeros((1, 2)), np.zeros(1, dtype=int))
