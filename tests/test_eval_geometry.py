"""Embedding geometry: every measure against a constructed case with a known answer."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_clip.eval.geometry import (alignment, covariance_spectrum, effective_rank,
                                         low_variance_share, modality_gap, modality_gap_vector, uniformity)


def _spread(variances: list[float], dim: int, seed: int = 0) -> torch.Tensor:
    """Points whose covariance eigenvalues are exactly proportional to ``variances`` (then zeros up to
    ``dim``): +-sqrt(v_k) e_k for every k, rotated by a random orthogonal matrix. Mean exactly zero."""
    rows = []
    for k, v in enumerate(variances):
        e = torch.zeros(dim, dtype=torch.float64)
        e[k] = math.sqrt(v)
        rows += [e, -e]
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows) @ q.T


def test_alignment_known_values():
    e = torch.eye(3)
    assert alignment(e, e) == pytest.approx(0.0, abs=1e-12)
    assert alignment(e, -e) == pytest.approx(4.0)
    assert alignment(e, -e, alpha=1.0) == pytest.approx(2.0)
    # pairs (e1, e1) and (e2, e3): distances^2 0 and 2 -> mean 1
    x, y = torch.stack([e[0], e[1]]), torch.stack([e[0], e[2]])
    assert alignment(x, y) == pytest.approx(1.0)
    # normalised inside: scaling rows changes nothing
    assert alignment(5 * x, torch.tensor([[0.1], [0.1]]) * y) == pytest.approx(1.0)


def test_alignment_rejects_unpaired():
    with pytest.raises(ValueError):
        alignment(torch.randn(3, 4), torch.randn(4, 4))


def test_uniformity_known_values():
    # orthonormal basis: every pair at squared distance 2 -> log exp(-2t) = -2t
    assert uniformity(torch.eye(5)) == pytest.approx(-4.0)
    assert uniformity(torch.eye(5), t=1.0) == pytest.approx(-2.0)
    # two antipodal points: squared distance 4
    assert uniformity(torch.tensor([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(-8.0)
    # duplicates are kept: pairs (e1, e1), (e1, e2), (e1, e2)
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert uniformity(x) == pytest.approx(math.log((1 + 2 * math.exp(-4)) / 3))
    # a single point repeated: every distance 0
    assert uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)


def test_uniformity_matches_wang_isola_reference():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    reference = torch.pdist(xn, p=2).pow(2).mul(-2).exp().mean().log()  # their uniform_loss
    assert uniformity(x) == pytest.approx(float(reference), rel=1e-10)


def test_uniformity_does_not_underflow():
    # 1000 points far apart with a large t: exp(-t d^2) underflows in float64, the logsumexp does not
    x = torch.eye(1000)
    assert uniformity(x, t=400.0) == pytest.approx(-800.0)


def test_modality_gap_known_values():
    image = torch.tensor([[2.0, 0.0, 0.0]]).repeat(4, 1)
    text = torch.tensor([[0.0, 0.5, 0.0]]).repeat(3, 1)
    assert modality_gap(image, text) == pytest.approx(math.sqrt(2))
    assert torch.allclose(modality_gap_vector(image, text), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    # centroids: image (e1 + e2) / 2, text e1 -> gap (-1/2, 1/2, 0)
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert modality_gap(image, torch.eye(3)[:1]) == pytest.approx(math.sqrt(0.5))
    assert modality_gap(image, image) == pytest.approx(0.0, abs=1e-12)


def test_effective_rank_equal_variances_on_subspace_is_exact():
    for k in (1, 3, 7):
        x = _spread([1.0] * k, dim=16, seed=k)
        assert effective_rank(x) == pytest.approx(k, abs=1e-9)
        assert effective_rank(x.float()) == pytest.approx(k, abs=1e-4)


def test_effective_rank_unequal_variances():
    # p = (1/2, 1/4, 1/4): entropy 1.5 log 2 -> erank 2^1.5
    assert effective_rank(_spread([2.0, 1.0, 1.0], dim=6)) == pytest.approx(2 ** 1.5, abs=1e-9)


def test_effective_rank_isotropic_gaussian_is_close_to_dim():
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    assert 7.95 < effective_rank(x) <= 8.0
    assert effective_rank(torch.ones(5, 3)) == 0.0  # no variance at all


def test_effective_rank_is_translation_invariant():
    x = _spread([1.0, 1.0], dim=4)
    assert effective_rank(x + 10.0) == pytest.approx(2.0, abs=1e-9)


def test_covariance_spectrum_has_dim_values_even_with_few_rows():
    lam = covariance_spectrum(_spread([3.0], dim=10))  # 2 rows, 10 dims
    assert lam.shape == (10,)
    assert lam[0] == pytest.approx(3.0 * 2 / 1)  # sum of squares 2 * 3 over n - 1 = 1
    assert torch.all(lam[1:].abs() < 1e-12)


def test_low_variance_share_known_values():
    # shares of the variance 0.5, 0.495, 0.005, 0: two of four directions under 1%
    x = _spread([0.5, 0.495, 0.005], dim=4)
    assert low_variance_share(x) == pytest.approx(0.5)
    assert low_variance_share(x, threshold=0.004) == pytest.approx(0.25)  # only the empty direction
    assert low_variance_share(x, threshold=0.6) == pytest.approx(1.0)
    assert low_variance_share(_spread([1.0] * 4, dim=4)) == 0.0


def test_low_variance_share_absolute_threshold_saturates_in_high_dim():
    # documented pitfall: equal variance over 128 directions is 0.78% each, under 1%
    x = _spread([1.0] * 128, dim=128)
    assert low_variance_share(x) == 1.0
    assert low_variance_share(x, threshold=0.5 / 128) == 0.0
