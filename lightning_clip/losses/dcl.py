"""Decoupled contrastive loss (Yeh et al. 2022, "Decoupled Contrastive Learning"), cross-modal form.

    z = s * I @ T^T,  l_i = -z_ii + log sum_{j != i} exp(z_ij),  L = (mean_i l_i^{I->T} + mean_j l_j^{T->I}) / 2

InfoNCE's gradient on the positive carries a factor (1 - p_ii) that vanishes once the positive dominates
its row, which couples the push on negatives to how well the positive already scores ("negative-positive
coupling"); removing the positive from the denominator removes that factor. The loss is no longer
bounded below by 0 (it goes to -inf as the positive separates), which is expected.

With a single item (N = 1, over all ranks) a row has no negatives: the denominator term is dropped and
the loss is -z_ii, still finite.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def _decoupled_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of -z_pos + logsumexp over the other columns."""
    rows = torch.arange(len(logits), device=logits.device)
    positive = logits[rows, labels]
    if logits.shape[1] == 1:  # no negatives anywhere: an all -inf logsumexp would give -inf and NaN grads
        return (-positive).mean()
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, labels] = True
    negatives = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1)
    return (negatives - positive).mean()


@full_precision
def dcl_terms(image: Tensor, text: Tensor, logit_scale, *, normalize_inputs: bool = False,
              gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: the two directional halves over the local rows."""
    check_pair("dcl", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    return {"i2t": _decoupled_rows(i2t, rows.labels), "t2i": _decoupled_rows(t2i, rows.labels)}


def dcl(image: Tensor, text: Tensor, logit_scale) -> Tensor:
    """Decoupled contrastive loss over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    terms = dcl_terms(image, text, logit_scale)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("dcl")
class DCLLoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. Same temperature convention as InfoNCE (init scale 1/0.07)."""

    def __init__(self, init_scale: float = 1 / 0.07, learn_scale: bool = True):
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = dcl_terms(emb.image, emb.text, self.logit_scale, normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
