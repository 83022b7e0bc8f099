"""CyCLIP (Goel et al. 2022, "CyCLIP: Cyclic Contrastive Language-Image Pretraining"; goel-shashank/CyCLIP):
InfoNCE plus two consistency regularisers on the similarity matrices.

    z = s I T^T,  L = [CE(z) + CE(z^T)] / 2
        + lambda_in    * N * mean_{j,k} (I_j.I_k - T_j.T_k)^2     (in-modal: the two Gram matrices agree)
        + lambda_cross * N * mean_{j,k} (I_j.T_k - I_k.T_j)^2     (cross-modal: I T^T is symmetric)

The factor N is the authors' (``... .square().mean() / scale^2 * batch_size``: their logits carry the
scale and divide it back out, so the regularisers are on raw cosines, as here). With both lambdas 0 the
loss is InfoNCE (same logits, same cross-entropy: equal to the last bit; a test).

Distributed: N * mean_{j,k} = (1/N) sum_{j,k}, a mean over rows j of a sum over all columns k, so the
regularisers decompose by rows like the cross-entropy: a rank sums its local rows against the gathered
columns and divides by its B rows; N is the *global* batch (the authors gather too).

Not tiled: the regularisers need the two in-modal Gram matrices besides I T^T (they could be visited in
tiles, but the kernel in `tiled.py` is InfoNCE-specific); use the dense loss.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def _check_lambdas(lambda_in, lambda_cross) -> None:
    finite_number("cyclip", "lambda_in", lambda_in, at_least=0)
    finite_number("cyclip", "lambda_cross", lambda_cross, at_least=0)


@full_precision
def cyclip_terms(image: Tensor, text: Tensor, logit_scale, *, normalize_inputs: bool = False,
                 gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i", "in_modal", "cross_modal"}``: the two cross-entropy halves and the two
    regularisers *before* their lambdas, each (1/B) sum over the local rows j of a sum over every k."""
    check_pair("cyclip", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    # same expression as infonce, so lambda = 0 gives its value to the last bit
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    labels = rows.labels
    b = rows.image.shape[0]
    in_modal = rows.image @ rows.image_all.T - rows.text @ rows.text_all.T       # [B, N]
    cos_i2t, cos_t2i = rows.pairwise(lambda a, c: a @ c.T)                        # I_j.T_k and T_j.I_k
    return {"i2t": F.cross_entropy(i2t, labels), "t2i": F.cross_entropy(t2i, labels),
            "in_modal": in_modal.square().sum() / b, "cross_modal": (cos_i2t - cos_t2i).square().sum() / b}


def _combine(terms: dict[str, Tensor], lambda_in: float, lambda_cross: float) -> Tensor:
    return (terms["i2t"] + terms["t2i"]) / 2 + lambda_in * terms["in_modal"] + lambda_cross * terms["cross_modal"]


def cyclip(image: Tensor, text: Tensor, logit_scale, lambda_in: float = 0.25, lambda_cross: float = 0.25) -> Tensor:
    """CyCLIP over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    _check_lambdas(lambda_in, lambda_cross)
    return _combine(cyclip_terms(image, text, logit_scale), lambda_in, lambda_cross)


@register_loss("cyclip")
class CyCLIPLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` (cross-entropy halves), ``in_modal`` and ``cross_modal`` (the regularisers
    before their lambdas). Temperature as InfoNCE (init 1/0.07, learned)."""

    def __init__(self, lambda_in: float = 0.25, lambda_cross: float = 0.25, init_scale: float = 1 / 0.07,
                 learn_scale: bool = True):
        _check_lambdas(lambda_in, lambda_cross)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.lambda_in, self.lambda_cross = float(lambda_in), float(lambda_cross)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = cyclip_terms(emb.image, emb.text, self.logit_scale, normalize_inputs=True, gathered=True)
        return LossOutput(_combine(terms, self.lambda_in, self.lambda_cross), terms)
