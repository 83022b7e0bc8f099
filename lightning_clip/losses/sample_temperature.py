"""Per-sample temperature: InfoNCE whose temperature is set per item by the variance heads (issue 28's
control for seed 000). The proposal (`probabilistic`) turns a predicted sigma into a sharper or flatter
softmax over distances, so part of what it learns may be a per-caption temperature rather than an
uncertainty: 2/sigma^2 plays the role of InfoNCE's scale (21 against InfoNCE's learned 19.9). This family
keeps only that part: the same log-std heads, used as a temperature on cosine logits, with no distance
variance and no normaliser term. If it reproduces the proposal's sign of rho(ln sigma, specificity), that
sign says "vague captions want a softer softmax", not "vague captions are more uncertain".

With cosine C_ij = <I_i, T_j> / (|I_i| |T_j|), the global learned scale s (init 1/0.07 and clamped to
[1, 100] like every family) and w = exp(-2 ln sigma), ln sigma clamped to [LN_STD_MIN, LN_STD_MAX] as in
`probabilistic` (sigma^2 is the temperature's factor):

    side "query" (default; each query softens or sharpens its own softmax):
        i2t (image i's row, over captions j):  logit_ij = s * w^I_i * C_ij
        t2i (caption j's row, over images i):  logit_ji = s * w^T_j * C_ij
    side "candidate" (the proposal's pairing: the scored item's sigma, without its -ln sigma term):
        i2t:  logit_ij = s * w^T_j * C_ij
        t2i:  logit_ji = s * w^I_i * C_ij
    L = (CE(i2t, arange N) + CE(t2i, arange N)) / 2

Retrieval. A positive factor on a query's row does not change the order of its candidates, so with side
"query" retrieval ranks by plain cosine (the base class's `similarity`): the heads can move recall only
through what they do to training (which pairs get large gradients), never at test time. With side
"candidate" the factor differs per column and does reorder; `similarity` then returns the mean of the two
directional logits, as `probabilistic.similarity` does.

Range: w lies in [e^-10, e^10], so |logit| <= 100 e^10 ~ 2.2e6; cross-entropy subtracts the row's maximum,
so nothing overflows in float32 (the heads get no gradient beyond the clamp, as in `probabilistic`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_variance_pair, full_precision, normalize
from lightning_clip.losses._options import choice
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather, split_rows
from lightning_clip.losses.probabilistic import LN_STD_MAX, LN_STD_MIN, directions_with_variance, retrieval_inputs
from lightning_clip.outputs import Embeddings, LossOutput

SIDES = ("query", "candidate")


def _check_side(side: str) -> None:
    choice("sample_temperature", "side", side, SIDES)


def inverse_temperature(ln_std: Tensor) -> Tensor:
    """w = exp(-2 ln sigma) = 1 / sigma^2 after the clamp: the per-item factor on the scale."""
    return torch.exp(-2 * ln_std.clamp(LN_STD_MIN, LN_STD_MAX))


@full_precision
def sample_temperature_terms(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor,
                             logit_scale, side: str = "query", *, normalize_inputs: bool = False,
                             gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: cross-entropy of the local image rows and of the local caption rows, each logit
    the cosine times ``logit_scale`` times the query's (``side="query"``) or the candidate's 1 / sigma^2.
    ``gathered``: local rows against every rank's columns; the query side needs only the local log-stds,
    the candidate side gathers them with the features so each rank's rows see every column's factor."""
    _check_side(side)
    check_variance_pair("sample_temperature", image, text, image_ln_std, text_ln_std)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    # [B, N] s * cosine, local images / local captions as rows; formed as InfoNCE forms it, so ln sigma = 0
    # (w = 1) gives InfoNCE's logits bit for bit
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    if side == "query":
        i2t = i2t * inverse_temperature(image_ln_std)[:, None]
        t2i = t2i * inverse_temperature(text_ln_std)[:, None]
    else:
        text_std_all = text_ln_std if rows.local else gather(text_ln_std)[0]
        image_std_all = image_ln_std if rows.local else gather(image_ln_std)[0]
        i2t = i2t * inverse_temperature(text_std_all)[None, :]
        t2i = t2i * inverse_temperature(image_std_all)[None, :]
    labels = rows.labels
    return {"i2t": F.cross_entropy(i2t, labels), "t2i": F.cross_entropy(t2i, labels)}


def sample_temperature(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor, logit_scale,
                       side: str = "query") -> Tensor:
    """The per-sample-temperature InfoNCE on ``[N, D]`` features that are already L2-normalised (as for
    `infonce`) and log-stds ``[N]``; ``logit_scale`` is the multiplier exp(log_scale)."""
    terms = sample_temperature_terms(image, text, image_ln_std, text_ln_std, logit_scale, side)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("sample_temperature")
class SampleTemperatureLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` and the mean predicted log-std of each side (``image_ln_std``, ``text_ln_std``).
    ``side``: whose sigma sets a logit's temperature, the query's ("query", default) or the scored item's
    ("candidate", the proposal's pairing)."""

    needs = frozenset({"image_ln_std", "text_ln_std"})

    def __init__(self, side: str = "query", init_scale: float = 1 / 0.07, learn_scale: bool = True):
        _check_side(side)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.side = side

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = sample_temperature_terms(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, self.logit_scale,
                                         self.side, normalize_inputs=True, gathered=True)
        return directions_with_variance(terms, emb)

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None) -> Tensor:
        """Cosine for side "query" (a row factor does not reorder a row); for side "candidate" the mean of
        the i2t logits (caption factors on the columns) and the t2i logits (image factors on the rows)."""
        if self.side == "query":
            return super().similarity(image, text)
        image, text, image_ln_std, text_ln_std = retrieval_inputs(image, text, image_ln_std, text_ln_std, True)
        cos = image @ text.T
        factor = (inverse_temperature(text_ln_std)[None, :] + inverse_temperature(image_ln_std)[:, None]) / 2
        return self.logit_scale.to(cos) * cos * factor
