"""CLIP's symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; open_clip `ClipLoss`; transformers `clip_loss`).

    logits = s * I @ T^T,  L = (CE(logits, arange N) + CE(logits^T, arange N)) / 2
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.outputs import Embeddings, LossOutput


def infonce(image: Tensor, text: Tensor, logit_scale: Tensor, *, logit_bias: Tensor | None = None,
            label_smoothing: float = 0.0) -> Tensor:
    """Symmetric cross-entropy over the [N, N] similarity matrix; `image`/`text` already normalised."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2



@register_loss("infonce")
class InfoNCELoss(ContrastiveLoss):
    def __init__(self, init_scale: float = 1 / 0.07, learn_scale: bool = True, label_smoothing: float = 0.0):
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.label_smoothing = label_smoothing

    def forward(self, emb: Embeddings) -> LossOutput:
        image = F.normalize(emb.image.float(), dim=-1)
        text = F.normalize(emb.text.float(), dim=-1)
        loss = infonce(image, text, self.logit_scale, label_smoothing=self.label_smoothing)
        return LossOutput(loss, {})
