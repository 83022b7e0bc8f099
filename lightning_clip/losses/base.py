"""The thin-module half of every loss family.

A family is a pure function in its own file plus a subclass of `ContrastiveLoss` that owns the learnable
log-scale (and bias), reads the `Embeddings` fields it needs and returns a `LossOutput`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clip.outputs import Embeddings, LossOutput

# open_clip's convention: the multiplier exp(log_scale) lives in [1, 100]; beyond 100 training is unstable.
LOG_SCALE_MAX = math.log(100.0)
SCALE_MIN = 1.0  # exp(0): the clamp's lower end


def cosine_similarity(image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                      text_ln_std: Optional[Tensor] = None) -> Tensor:
    """Cosine similarity ``[N_image, N_text]`` in float32: the default retrieval score of every family
    (`ContrastiveLoss.similarity`) and of evaluation (retrieval, zero-shot); the variance arguments are ignored."""
    return F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T


class ContrastiveLoss(nn.Module):
    """Base class. Subclasses set `needs` and implement `forward`.

    `needs` tells `ClipModule` which optional heads to build: "image_ln_std"/"text_ln_std" (variance
    heads), "regions"/"words" (local features, for DAMSM), "groups" (group ids from the batch).
    """

    registry_name: str = "?"
    needs: frozenset = frozenset()
    #: parameter names that must not get weight decay (decay on a log-temperature drags it toward 0)
    no_decay: tuple = ("log_scale", "bias")

    def __init__(self, init_scale: Optional[float] = None, learn_scale: bool = True,
                 init_bias: Optional[float] = None, learn_bias: bool = True):
        super().__init__()
        if init_scale is not None:
            if init_scale <= 0:
                raise ValueError(f"init_scale must be > 0, got {init_scale}")
            if not SCALE_MIN <= init_scale <= math.exp(LOG_SCALE_MAX) * (1 + 1e-9):
                # clamp_ would move it into [1, 100] after the first optimizer step: a fixed scale would
                # train at another value than the one asked for, a learned one would jump
                raise ValueError(
                    f"model.loss_args.init_scale={init_scale:g} is outside the scale range [{SCALE_MIN:g}, "
                    f"{math.exp(LOG_SCALE_MAX):g}] that every optimizer step clamps to (open_clip's; "
                    f"learn_scale={learn_scale}); give an init_scale inside it (the temperature is 1 / scale)")
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        else:
            self.log_scale = None
        if init_bias is not None:
            self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_bias)
        else:
            self.bias = None

    # -- temperature ---------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> Optional[Tensor]:
        """The multiplier exp(log_scale), computed in float32 even under autocast."""
        return None if self.log_scale is None else self.log_scale.float().exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Called after every optimizer step: keep the scale in [1, 100] (open_clip)."""
        if self.log_scale is not None:
            self.log_scale.clamp_(0.0, LOG_SCALE_MAX)

    def scalars(self) -> dict[str, float]:
        """Values the temperature callback logs."""
        out = {}
        if self.log_scale is not None:
            out["log_scale"] = float(self.log_scale.detach())
            out["scale"] = math.exp(out["log_scale"])
        if self.bias is not None:
            out["bias"] = float(self.bias.detach())
        return out

    # -- retrieval -----------------------------------------------------------------------------------
    def retrieval_inputs(self, emb: Embeddings) -> tuple[Tensor, Tensor]:
        """The per-item ``(image, text)`` tensors validation keeps for `similarity` (one row per item, any
        trailing shape): the pooled embeddings by default; filip keeps its tokens."""
        return emb.image, emb.text

    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None) -> Tensor:
        """Score matrix [N_image, N_text] used to rank at validation. Cosine similarity by default;
        families with another notion of match (probabilistic) override it."""
        return cosine_similarity(image, text)

    def forward(self, emb: Embeddings) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError
