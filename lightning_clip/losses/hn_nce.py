"""HN-NCE, the hard-negative InfoNCE of Radenovic et al. 2023 ("Filtering, Distillation, and Hard
Negatives for Vision-Language Pre-Training"): negatives are re-weighted by how hard they are.

Per direction, with z = s S (S = I T^T for image anchors, S^T for caption anchors):

    w_ij = (N - 1) e^{beta z_ij} / sum_{k != i} e^{beta z_ik}                   (mean weight 1 per row)
    L_i  = -log( e^{z_ii} / (alpha e^{z_ii} + sum_{j != i} w_ij e^{z_ij}) )
    L    = (mean_i L_i^{I->T} + mean_i L_i^{T->I}) / 2

The gradient flows through w (autograd of the formula as written). Everything is in log space:
log w_ij = ln(N - 1) + beta z_ij - logsumexp_{k != i} beta z_ik and the denominator is one logsumexp over
[ln alpha + z_ii, log w_ij + z_ij], so scale 100 and any beta stay finite. alpha = 1, beta = 0 gives
w = 1 and InfoNCE (a test; beta = 0 sets log w = 0 exactly rather than ln(N-1) - ln(N-1)).

A row with no negatives (N = 1 over all ranks) has L_i = -log(1 / alpha) = ln alpha (0 at alpha = 1).
alpha must be > 0 (alpha = 0 leaves the positive out of the denominator, DCL-style; use `dcl`).

Distributed: each row needs its own anchor against every column (w is normalised within the row over
the global columns, N the global batch), so it decomposes by rows like InfoNCE. Not tiled: the row
weights need a second log-sum-exp per row at another temperature, which `tiled.py`'s kernel does not have.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def _check(alpha, beta) -> None:
    finite_number("hn_nce", "alpha", alpha, above=0)
    finite_number("hn_nce", "beta", beta)


def _hard_negative_rows(z: Tensor, labels: Tensor, alpha: float, beta: float) -> Tensor:
    """Mean over the rows of ``z`` [B, N] (positive of row i in column labels[i]) of L_i."""
    rows = torch.arange(z.shape[0], device=z.device)
    positive = z[rows, labels]
    n = z.shape[1]
    if n == 1:  # no negatives: L = ln alpha, constant (z * 0 keeps the graph and the dtype)
        return (positive * 0 + math.log(alpha)).mean()
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[rows, labels] = True
    if beta == 0:
        log_w = torch.zeros_like(z).masked_fill(mask, float("-inf"))
    else:
        bz = (beta * z).masked_fill(mask, float("-inf"))
        log_w = math.log(n - 1) + bz - torch.logsumexp(bz, dim=1, keepdim=True)   # -inf on the positive
    negatives = log_w + z
    denominator = torch.logsumexp(torch.cat([(positive + math.log(alpha))[:, None], negatives], dim=1), dim=1)
    return (denominator - positive).mean()


@full_precision
def hn_nce_terms(image: Tensor, text: Tensor, logit_scale, *, alpha: float = 1.0, beta: float = 0.5,
                 normalize_inputs: bool = False, gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: the mean L_i of the local image rows and of the local caption rows."""
    _check(alpha, beta)
    check_pair("hn_nce", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    return {"i2t": _hard_negative_rows(i2t, rows.labels, alpha, beta),
            "t2i": _hard_negative_rows(t2i, rows.labels, alpha, beta)}


def hn_nce(image: Tensor, text: Tensor, logit_scale, alpha: float = 1.0, beta: float = 0.5) -> Tensor:
    """HN-NCE over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    terms = hn_nce_terms(image, text, logit_scale, alpha=alpha, beta=beta)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("hn_nce")
class HNNCELoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. Temperature as InfoNCE (init 1/0.07, learned); ``alpha`` (weight of the
    positive in the denominator) and ``beta`` (hardness concentration) are fixed."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, init_scale: float = 1 / 0.07,
                 learn_scale: bool = True):
        _check(alpha, beta)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = hn_nce_terms(emb.image, emb.text, self.logit_scale, alpha=self.alpha, beta=self.beta,
                             normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
