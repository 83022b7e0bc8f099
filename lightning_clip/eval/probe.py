"""Linear probe on frozen features: how much of a label a linear classifier can read off an embedding.

The protocol of CLIP (Radford et al. 2021, Appendix A.3): an L-BFGS multinomial logistic regression on
the frozen features, its L2 regularisation strength chosen on a validation split held out from the
training features, then refitted on all of them and scored on the test features. CLIP_benchmark's
``linear_probe`` chooses its weight decay the same way (held-out split, refit). Features are
standardised (mean 0, variance 1 per dimension, statistics from the fitted split only) so that one grid
of C suits embeddings of any scale.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit(x: np.ndarray, y: np.ndarray, C: float):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    with warnings.catch_warnings():
        # With weak regularisation on separable features the optimum is at infinity and L-BFGS stops at
        # max_iter; the predictions it has then are the ones being measured.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``top1`` and ``mean_per_class`` (mean over the classes present in ``y`` of their recall)."""
    correct = pred == y
    recalls = [correct[y == c].mean() for c in np.unique(y)]
    return {"top1": float(correct.mean()), "mean_per_class": float(np.mean(recalls))}


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Seeded train/validation split, stratified when scikit-learn can stratify it (every class twice or
    more, and at least one item per class on both sides)."""
    try:
        return train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    except ValueError:
        return train_test_split(x, y, test_size=val_fraction, random_state=seed)


def linear_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                 Cs: Sequence[float] = (0.01, 0.1, 1, 10, 100), val_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, float]:
    """Fit a linear probe on ``train_x`` (``[N, D]``) / ``train_y`` (``[N]`` integer labels) and score it
    on the test features.

    Each C of ``Cs`` (inverse L2 strength) is fitted on ``1 - val_fraction`` of the training features and
    scored (top-1) on the rest; the best C is refitted on all training features. Ties go to the smallest
    C (the simplest model). Test items of a class absent from the training labels cannot be predicted
    and count as errors. Returns ``top1``, ``mean_per_class`` (balanced accuracy over the classes present
    in ``test_y``) and the chosen ``C``.
    """
    train_x, train_y, test_x, test_y = map(_numpy, (train_x, train_y, test_x, test_y))
    if len(np.unique(train_y)) < 2:
        raise ValueError("a linear probe needs at least two classes in the training labels")
    if not Cs:
        raise ValueError("Cs is empty")
    Cs = sorted(float(c) for c in Cs)
    if len(Cs) == 1:
        best_C = Cs[0]
    else:
        fit_x, val_x, fit_y, val_y = _split(train_x, train_y, val_fraction, seed)
        val_top1 = [_scores(_fit(fit_x, fit_y, C).predict(val_x), val_y)["top1"] for C in Cs]
        best_C = Cs[int(np.argmax(val_top1))]  # argmax: first (smallest) C among ties
    pred = _fit(train_x, train_y, best_C).predict(test_x)
    return {**_scores(pred, test_y), "C": best_C}
