"""CLIP's symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; open_clip `ClipLoss`; transformers `clip_loss`).

    logits = s * I @ T^T (+ b),  L = (CE(logits, arange N) + CE(logits^T, arange N)) / 2

with optional label smoothing (torch's: eps spread uniformly over the N columns). A bias adds the same
constant to every logit of a row, so cross-entropy ignores it; it is accepted for symmetry with SigLIP.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import is_distributed, split_rows
from lightning_clip.outputs import Embeddings, LossOutput


@full_precision
def infonce_terms(image: Tensor, text: Tensor, logit_scale, logit_bias=None, label_smoothing: float = 0.0,
                  *, normalize_inputs: bool = False, gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: mean cross-entropy of the local image rows (over every caption) and of the
    local caption rows (over every image). ``gathered``: local rows against the columns of every rank."""
    check_pair("infonce", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)

    def logits(a, b):
        out = logit_scale * a @ b.T
        return out if logit_bias is None else out + logit_bias

    i2t, t2i = rows.pairwise(logits)
    labels = rows.labels
    return {"i2t": F.cross_entropy(i2t, labels, label_smoothing=label_smoothing),
            "t2i": F.cross_entropy(t2i, labels, label_smoothing=label_smoothing)}


def infonce(image: Tensor, text: Tensor, logit_scale, *, logit_bias=None, label_smoothing: float = 0.0,
            chunk_size: Optional[int] = None) -> Tensor:
    """Symmetric InfoNCE over ``[N, D]`` features that are already L2-normalised; ``logit_scale`` is the
    multiplier exp(log_scale). ``chunk_size`` switches to the memory-linear tiled kernel (same values)."""
    if chunk_size is not None:
        check_pair("infonce", image, text)
        from lightning_clip.losses.tiled import tiled_infonce
        return tiled_infonce(image, text, logit_scale, logit_bias=logit_bias, label_smoothing=label_smoothing,
                             chunk_size=chunk_size)
    terms = infonce_terms(image, text, logit_scale, logit_bias, label_smoothing)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("infonce")
class InfoNCELoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i`` (the two cross-entropy halves). ``chunk_size`` (single process only) uses
    the tiled kernel; under DDP each rank already holds only a [B, N] slab of logits."""

    def __init__(self, init_scale: float = 1 / 0.07, learn_scale: bool = True, label_smoothing: float = 0.0,
                 chunk_size: Optional[int] = None):
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        finite_number("infonce", "label_smoothing", label_smoothing, at_least=0, below=1)
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size

    def forward(self, emb: Embeddings) -> LossOutput:
        if self.chunk_size is not None and not is_distributed():
            image, text = normalize(emb.image.float()), normalize(emb.text.float())
            loss = infonce(image, text, self.logit_scale, label_smoothing=self.label_smoothing,
                           chunk_size=self.chunk_size)
            return LossOutput(loss, {})
        terms = infonce_terms(emb.image, emb.text, self.logit_scale, None, self.label_smoothing,
                              normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
