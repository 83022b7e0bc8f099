"""InfoNCE restricted to k sampled negatives ("sampled softmax"): the softmax counterpart of `nce`, so that
the number of negatives and the loss form (softmax vs sigmoid) can be varied separately (issue 28).

For image i (and, mirrored, for caption i) with k negatives j_1..j_k drawn from the *other* items of the
(global) batch by nce's sampler (`sample_negatives`; without replacement by default)::

    l_i = -log [ exp(s C_ii) / (exp(s C_ii) + sum_m exp(s C_{i j_m})) ],   C = I @ T^T
        = CE over the k + 1 logits (s C_ii, s C_{i j_1}, ..., s C_{i j_k}) with the positive first
    L = (mean_i l_i^{I->T} + mean_i l_i^{T->I}) / 2

With ``replacement=False`` and k = N - 1 the candidate set of every row is the whole batch, and L equals
`infonce` exactly (a log-sum-exp does not depend on the order of its terms); smaller k drops terms from
the normaliser, so L is a lower bound on InfoNCE that loosens as k falls (k = 0: L = 0). No bias: a
constant added to every logit of a row cancels in the softmax. The scale starts at 1/0.07 and is learned,
as infonce's. The seed and the DDP decomposition are nce's: every rank draws the same global [2, N, k]
indices and keeps its own rows, whose logits against the gathered columns it already holds.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.losses.nce import NegativeSampler, Seed, _num_negatives, _replacement, sample_negatives
from lightning_clip.outputs import Embeddings, LossOutput

FAMILY = "sampled_infonce"


def _softmax_rows(logits: Tensor, labels: Tensor, negatives: Tensor) -> Tensor:
    """Mean over rows of CE with the positive first: ``logits`` [B, N] against every column; ``labels``
    [B] each row's positive column; ``negatives`` [B, k] its sampled columns."""
    positive = logits.gather(1, labels[:, None])                    # [B, 1]
    candidates = torch.cat([positive, logits.gather(1, negatives)], 1)  # [B, k + 1]
    return (torch.logsumexp(candidates, 1) - positive[:, 0]).mean()


@full_precision
def sampled_infonce_terms(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
                          generator: Optional[torch.Generator] = None, replacement: bool = False,
                          clamp_to_batch: bool = False, normalize_inputs: bool = False,
                          gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: image anchors against sampled captions and caption anchors against images.
    ``clamp_to_batch``: without replacement, a batch of N <= k uses its N - 1 others (validation)."""
    check_pair(FAMILY, image, text)
    num_negatives = _num_negatives(num_negatives, FAMILY)
    replacement = _replacement(replacement, FAMILY)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    b = rows.image.shape[0]
    idx = sample_negatives(len(rows.image_all), num_negatives, generator, replacement, family=FAMILY,
                           clamp_to_batch=clamp_to_batch).to(image.device)
    idx = idx[:, rows.offset: rows.offset + b]
    # The [B, N] logits of the local rows, then a gather: one matmul instead of B copies of k keys, and
    # the same gradient (columns never drawn get none).
    i2t, t2i = rows.pairwise(lambda a, c: logit_scale * a @ c.T)
    labels = rows.labels
    return {"i2t": _softmax_rows(i2t, labels, idx[0]), "t2i": _softmax_rows(t2i, labels, idx[1])}


def sampled_infonce(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
                    generator: Optional[torch.Generator] = None, replacement: bool = False) -> Tensor:
    """Sampled-softmax InfoNCE over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    terms = sampled_infonce_terms(image, text, logit_scale, num_negatives=num_negatives, generator=generator,
                                  replacement=replacement)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss(FAMILY)
class SampledInfoNCELoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. ``num_negatives`` k per anchor (default 5, nce's count), drawn without
    replacement by default (nce draws with replacement by default: the `negatives` cells set
    ``replacement: false`` on both, so that only the loss form differs); ``seed`` as nce's
    (`NegativeSampler`: "run" follows the run's seed, an int is fixed, None uses torch's global RNG)."""

    def __init__(self, num_negatives: int = 5, init_scale: float = 1 / 0.07, learn_scale: bool = True,
                 replacement: bool = False, seed: Seed = "run"):
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.num_negatives = _num_negatives(num_negatives, FAMILY)
        self.replacement = _replacement(replacement, FAMILY)
        self.sampler = NegativeSampler(FAMILY, seed)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = sampled_infonce_terms(emb.image, emb.text, self.logit_scale, num_negatives=self.num_negatives,
                                      generator=self.sampler.generator(self.training),
                                      replacement=self.replacement, clamp_to_batch=not self.training,
                                      normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
