"""Small dataclasses that every part of the pipeline agrees on.

`Embeddings` is what `ClipModule.forward` hands to a loss module; `LossOutput` is what a loss module
returns. Keeping them as plain dataclasses (not dicts) means a typo in a field name fails loudly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Embeddings:
    """Outputs of the two towers after their projection heads.

    Shapes use N for the (local) batch, D for the shared embedding size.

    - ``image``, ``text``: ``[N, D]`` projections, *not* L2-normalised. Each loss decides whether to
      normalise (CLIP does, the tutorial's soft-target loss as written does not).
    - ``image_ln_std``, ``text_ln_std``: ``[N]`` predicted log standard deviations (variance heads),
      present only for losses that ask for them.
    - ``regions``: ``[N, R, D]`` projected region features (ViT patch tokens or CNN feature-map cells);
      ``region_mask``: ``[N, R]`` bool, True for real regions (None means all real).
    - ``words``: ``[N, L, D]`` projected token features; ``word_mask``: ``[N, L]`` bool, True for real
      tokens (padding and special tokens are False).
    - ``image_groups``, ``text_groups``: ``[N]`` integer ids; items with equal ids are positives of each
      other (duplicate images, several captions of one image). None means all distinct.
    - ``relevance``: ``[N, N]`` bool, the batch's oracle matrix (entry (i, j): caption j is true of image
      i), synthetic data only; present only for losses that ask for it (``multi_positive`` with
      ``positives="oracle"``). It describes one local batch: it is not gathered across ranks.
    - ``image_ids``, ``text_ids``: ``[N]`` long identities of each row's image and caption (53-bit
      hashes, equal across runs and ranks), for losses that keep per-item state (``gcl``).
    - ``teacher_image``, ``teacher_text``: ``[N, D_teacher]`` L2-normalised projections of the same rows by
      a frozen teacher model (``model.teacher``), without gradient; present only for losses that ask for
      them (``soft_targets`` with ``targets="teacher"``: its soft targets come from them).
    """

    image: Tensor
    text: Tensor
    image_ln_std: Optional[Tensor] = None
    text_ln_std: Optional[Tensor] = None
    regions: Optional[Tensor] = None
    region_mask: Optional[Tensor] = None
    words: Optional[Tensor] = None
    word_mask: Optional[Tensor] = None
    image_groups: Optional[Tensor] = None
    text_groups: Optional[Tensor] = None
    relevance: Optional[Tensor] = None
    image_ids: Optional[Tensor] = None
    text_ids: Optional[Tensor] = None
    teacher_image: Optional[Tensor] = None
    teacher_text: Optional[Tensor] = None

    def map(self, fn) -> "Embeddings":
        """Apply ``fn`` to every tensor field that is set (detach, move, cast, gather...)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def detach(self) -> "Embeddings":
        return self.map(lambda t: t.detach())

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]


@dataclass
class LossOutput:
    """A scalar loss plus named terms worth logging (logged as ``train/loss/<term>``)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
