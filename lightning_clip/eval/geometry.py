"""Geometry of an embedding space: how a contrastive loss arranges the two modalities.

Pure functions on ``[N, D]`` tensors (any float dtype; computed in float64, returned as python floats).

- `alignment`, `uniformity`: Wang & Isola, "Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere", ICML 2020 (their ``align_loss`` / ``uniform_loss``).
- `modality_gap`: Liang et al., "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive
  Representation Learning", NeurIPS 2022 (distance between the modality centroids).
- `effective_rank`: Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO
  2007, applied to the spectrum of the embedding covariance.
- `low_variance_share`: dimensional collapse (Jing et al., "Understanding Dimensional Collapse in
  Contrastive Self-supervised Learning", ICLR 2022, plot the same covariance spectrum).

Every function that compares points on the sphere (alignment, uniformity, gap) L2-normalises inside, so
raw head outputs can be passed. The spectral ones (`effective_rank`, `low_variance_share`) measure the
tensor they are given; `lightning_clip.eval.suite` gives them the normalised embeddings, the space the
losses score in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    # float64: the uniformity of a well-spread set is a log of a mean of tiny exponentials, and the
    # spectra below sum eigenvalues that differ by orders of magnitude.
    return F.normalize(x.detach().double(), dim=-1)


def _check_pairs(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"expected two [N, D] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """``mean_i ||x_i - y_i||_2^alpha`` over positive pairs (row i of ``x`` with row i of ``y``), on
    L2-normalised rows. 0 = every pair coincides; 4 (alpha = 2) = every pair antipodal.
    Wang & Isola 2020, eq. 2 (``align_loss``)."""
    _check_pairs(x, y)
    return float((_unit(x) - _unit(y)).norm(dim=1).pow(alpha).mean())


def uniformity(x: Tensor, t: float = 2.0) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||_2^2)`` over all pairs of distinct rows, on L2-normalised
    rows; lower = more uniform on the sphere. Identical rows are kept (duplicates are part of the
    distribution being measured). Wang & Isola 2020, eq. 3 (``uniform_loss``), computed as a logsumexp so
    that well-spread sets do not underflow."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs an [N, D] tensor with N >= 2, got {tuple(x.shape)}")
    sq = torch.pdist(_unit(x)).pow(2)  # the N(N-1)/2 pairs i < j
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def modality_gap_vector(image: Tensor, text: Tensor) -> Tensor:
    """``mean_i image_i / ||image_i|| - mean_j text_j / ||text_j||`` (float64, shape ``[D]``): the gap
    direction of Liang et al. 2022. The two sets need not have the same size."""
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    return _unit(image).mean(0) - _unit(text).mean(0)


def modality_gap(image: Tensor, text: Tensor) -> float:
    """Euclidean distance between the centroids of the L2-normalised image and text embeddings
    (Liang et al. 2022, Sec. 3): 0 = the modalities share a centroid, at most 2."""
    return float(modality_gap_vector(image, text).norm())


def covariance_spectrum(x: Tensor) -> Tensor:
    """The D eigenvalues (descending, float64, >= 0) of the covariance of the centred rows of ``x``.

    ``eigvalsh`` of the ``[D, D]`` covariance rather than singular values of ``x``, so that there are
    always D of them (with N < D the missing directions carry zero variance, and they count in
    `low_variance_share`). Round-off below zero is clamped."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"the covariance needs an [N, D] tensor with N >= 2, got {tuple(x.shape)}")
    x = x.detach().double()
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / (x.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def effective_rank(x: Tensor) -> float:
    """``exp(-sum_k p_k log p_k)`` with ``p_k = lambda_k / sum_l lambda_l`` over the covariance
    eigenvalues of ``x`` (``0 log 0 = 0``): Roy & Vetterli 2007, eq. 2-3, on the covariance spectrum
    (equivalently the squared singular values of the centred data; Roy & Vetterli use a matrix's
    singular values, here the matrix is the covariance). Between 1 and D: k for variance spread equally
    over k directions, close to D for an isotropic cloud; 0 when ``x`` has no variance at all."""
    lam = covariance_spectrum(x)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam / total
    entropy = -torch.special.xlogy(p, p).sum()  # xlogy(0, 0) = 0
    return float(entropy.exp())


def low_variance_share(x: Tensor, threshold: float = 0.01) -> float:
    """Share of the D principal directions (covariance eigenvectors) whose eigenvalue is under
    ``threshold`` of the total variance: ``#{k : lambda_k < threshold * sum lambda} / D``.

    A measure of dimensional collapse. Note the absolute threshold: with D > 1/threshold even a perfectly
    isotropic cloud has every direction under it (D = 128 and 1%: 1/128 = 0.78%), so compare runs of the
    same D, or pass ``threshold = c / D`` for "under c times the uniform share"."""
    lam = covariance_spectrum(x)
    return float((lam < threshold * lam.sum()).double().mean())
