"""The Bayes ceiling: the expected R@1 of the generator's own likelihood used as the scorer.

The oracle ceiling (`retrieval.oracle_ceiling`) scores every image a caption accepts alike and breaks the
tie at random. That is not the best possible scorer on the synthetic world: the generator makes some
accepted images likelier sources than others (a one-object red image is a likelier source of "a red thing"
than a three-object one, and "a red circle and a blue square" is only ever written with the objects in the
scene's order). The Bayes scorer ranks by the posterior P(image | caption) = P(caption | image) / sum over
the split's images (uniform prior), with `data.likelihood.likelihood_matrix` as P(caption | image):

- t2i: per caption, the images of highest likelihood; R@1 is |own image among them| / |them|.
- i2t: per image, the captions of highest posterior (a caption that many images could have written is
  weaker evidence, as in the oracle ceiling); R@1 is |own captions among them| / |them|.

Items, ids and "own" are those of plain R@1 (`retrieval.retrieval_metrics`: deduplicated images, each
caption paired with the image it was written for). Where the likelihood is flat over the accepted images
both ceilings agree; per split the Bayes ceiling is at least the oracle's in expectation (it is the
optimal scorer), and a trained model can beat it only by sampling luck.

Exactness matters because ties are broken at random: the likelihoods are integers over a per-caption
denominator, so t2i compares integers, and the i2t posteriors are one correctly rounded division of two
integers each, so equal fractions give equal floats (distinct ones differ far above rounding).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[np.ndarray, Tensor]


def _np(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def bayes_ceiling(likelihood: Array, image_ids: Array, text_image_ids: Array) -> dict[str, Tensor]:
    """Expected R@1 both ways of ranking by ``likelihood`` ``[Nt, Ni]`` (P(caption | image), any positive
    scale per caption row: integers keep ties exact), ties broken uniformly at random.

    ``image_ids`` ``[Ni]`` name the deduplicated images, ``text_image_ids`` ``[Nt]`` the image each caption
    was written for. A query whose best score is 0 (nothing can have produced it) scores 0. Returns
    ``{"t2i/R@1", "i2t/R@1"}`` as 0-dim float tensors, like `oracle_ceiling`."""
    lik = _np(likelihood)
    image_ids, text_image_ids = _np(image_ids).reshape(-1), _np(text_image_ids).reshape(-1)
    n_txt, n_img = text_image_ids.size, image_ids.size
    if lik.shape != (n_txt, n_img):
        raise ValueError(f"likelihood must be [n_texts={n_txt}, n_images={n_img}], got {tuple(lik.shape)}")
    if n_txt == 0 or n_img == 0:
        raise ValueError(f"the ceiling needs at least one image and one caption, got {n_img} and {n_txt}")
    if (lik < 0).any():
        raise ValueError("likelihoods must be non-negative")
    own = text_image_ids[:, None] == image_ids[None, :]
    # t2i: the argmax images of each caption's row
    best = lik.max(1, keepdims=True)
    top = (lik == best) & (best > 0)
    t2i = (own & top).sum(1) / np.maximum(top.sum(1), 1)
    # i2t: the argmax captions of each image's column of posteriors
    total = lik.sum(1, keepdims=True)
    post = np.where(total > 0, lik / np.where(total > 0, total, 1), 0.0).astype(np.float64)
    best = post.max(0, keepdims=True)
    top = (post == best) & (best > 0)
    i2t = (own & top).sum(0) / np.maximum(top.sum(0), 1)
    return {"t2i/R@1": torch.tensor(float(t2i.mean())), "i2t/R@1": torch.tensor(float(i2t.mean()))}


def caption_likelihoods(captions: Optional[Sequence[Optional[str]]],
                        scenes: Optional[Sequence[Optional[dict]]]) -> Optional[np.ndarray]:
    """P(caption | image) as integers ``[Nt, Ni]`` (exact up to a per-caption scale) under the synthetic
    generator, or None unless every caption is a text it renders and every image has a scene."""
    if captions is None or scenes is None or any(c is None for c in captions) or any(s is None for s in scenes):
        return None
    from lightning_clip.data.likelihood import likelihood_matrix

    try:
        num, _ = likelihood_matrix(list(captions), list(scenes))
    except ValueError:  # a caption the generator cannot write: the data is not (only) the synthetic world's
        return None
    return num


def bayes_ceiling_of(captions: Optional[Sequence[Optional[str]]], scenes: Optional[Sequence[Optional[dict]]],
                     image_ids: Array, text_image_ids: Array) -> Optional[dict[str, Tensor]]:
    """`bayes_ceiling` of the generator's likelihood of ``captions`` (texts, ``text_image_ids`` order) given
    ``scenes`` (``image_ids`` order); None without that ground truth (real data)."""
    lik = caption_likelihoods(captions, scenes)
    return None if lik is None else bayes_ceiling(lik, image_ids, text_image_ids)
