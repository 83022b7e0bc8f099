"""Negative sampling as in word2vec (Mikolov et al. 2013; seed 002's "noise contrastive estimation"
section): each positive pair is a binary problem against k sampled negatives instead of a softmax over
the whole batch.

For image i (and, mirrored, for caption i) with k negatives j_1..j_k drawn uniformly, with replacement,
from the *other* items of the (global) batch::

    z_ij = s * I_i . T_j + b
    l_i = -log sigmoid(z_ii) - sum_m log sigmoid(-z_{i j_m})      (binary cross-entropy with logits)
    L = (mean_i l_i^{I->T} + mean_i l_i^{T->I}) / 2

The scale s and bias b are learned (init 10 and -ln k: a positive is one in k + 1 candidates, so the
prior log-odds are -ln k). The sampler is a `torch.Generator`, seeded, on the CPU: every rank draws the
same global [N, k] indices and keeps its own rows, so distributed training samples exactly what one
process would on the concatenated batch. With N = 1 there is nothing to sample and only the positive
term remains.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import integer
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def sample_negatives(n: int, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[2, n, k]`` indices: for each direction and each anchor i, k draws from {0..n-1} \\ {i}."""
    if n < 2 or k == 0:
        return torch.empty(2, n, 0, dtype=torch.long)
    device = generator.device if generator is not None else torch.device("cpu")
    r = torch.randint(0, n - 1, (2, n, k), generator=generator, device=device)
    anchor = torch.arange(n, device=device)[None, :, None]
    return (r + (r >= anchor)).cpu()  # skip the anchor itself


def _num_negatives(k) -> int:
    return integer("nce", "num_negatives", k, at_least=0)


def _binary_rows(anchor: Tensor, paired: Tensor, keys: Tensor, negatives: Tensor, scale, bias) -> Tensor:
    positive = scale * (anchor * paired).sum(-1) + bias                        # [B]
    negative = scale * torch.einsum("bd,bkd->bk", anchor, keys[negatives]) + bias  # [B, k]
    return (F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


@full_precision
def nce_terms(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
              generator: Optional[torch.Generator] = None, logit_bias=None, normalize_inputs: bool = False,
              gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: image anchors against sampled captions and caption anchors against images."""
    check_pair("nce", image, text)
    num_negatives = _num_negatives(num_negatives)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    bias = 0.0 if logit_bias is None else logit_bias
    b = rows.image.shape[0]
    idx = sample_negatives(len(rows.image_all), num_negatives, generator).to(image.device)
    idx = idx[:, rows.offset: rows.offset + b]
    # the partner of a local anchor is local too
    return {"i2t": _binary_rows(rows.image, rows.text, rows.text_all, idx[0], logit_scale, bias),
            "t2i": _binary_rows(rows.text, rows.image, rows.image_all, idx[1], logit_scale, bias)}


def nce(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
        generator: Optional[torch.Generator] = None, logit_bias=None) -> Tensor:
    """Negative-sampling loss over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    terms = nce_terms(image, text, logit_scale, num_negatives=num_negatives, generator=generator,
                      logit_bias=logit_bias)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("nce")
class NCELoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. ``seed`` seeds the sampler (None: torch's global RNG)."""

    def __init__(self, num_negatives: int = 5, init_scale: float = 10.0, learn_scale: bool = True,
                 init_bias: Optional[float] = None, learn_bias: bool = True, seed: Optional[int] = 0):
        num_negatives = _num_negatives(num_negatives)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale,
                         init_bias=-math.log(max(num_negatives, 1)) if init_bias is None else init_bias,
                         learn_bias=learn_bias)
        self.num_negatives = num_negatives
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = nce_terms(emb.image, emb.text, self.logit_scale, num_negatives=self.num_negatives,
                          generator=self.generator, logit_bias=self.bias.float(), normalize_inputs=True,
                          gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
