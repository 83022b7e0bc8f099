"""FILIP (Yao et al. 2022, "FILIP: Fine-grained Interactive Language-Image Pre-Training"): token-wise late
interaction. Every image token finds its best-matching word, every word its best-matching image token:

    s^I_ij = mean over image i's real tokens k of  max over caption j's real tokens r of x_ik . y_jr
    s^T_ij = mean over caption j's real tokens r of max over image i's real tokens k of x_ik . y_jr
    L = [CE(s * s^I) + CE(s * (s^T)^T)] / 2

Images rank captions by s^I and captions rank images by s^T. Tokens are the module's region and word
features (its own heads, like DAMSM's), L2-normalised; padding (mask False) never enters a max or a mean:
padded tokens are zeroed before the products and masked to -inf before each max, so any finite garbage
there changes nothing (a test).

Memory: the [Ni, Nj, K, R] token products of a batch are built at once (64 x 64 pairs x 16 regions x 32
words is 8 MiB in float32); FILIP's own trick of gathering only the token maxima is not needed at this size.

Distributed: rows decompose (each CE row is one item against every item): a rank computes its images
against every caption's (gathered, padded) words for s^I, and every image's regions against its captions
for s^T. Not tiled (the tiled kernels are for dot-product logits of pooled features).

Retrieval uses the same token-wise scores: `retrieval_inputs` makes validation keep every item's tokens
(``[N, K, 1 + D]``: a real-token flag, then the L2-normalised token) instead of the pooled features, and
`similarity` ranks captions for an image query by s^I and images for a caption query by s^T (the metric
passes ``direction``). Validation batches must share one caption length (the data module pads to
``data.max_length``), or the kept tokens cannot be concatenated. Cost: the token products of every
(image, caption) pair of the validation set, in blocks of at most 2^22 products (16 MiB in float32).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, check_token_pair, full_precision, normalize, pairwise_blocks
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather_tokens, is_distributed
from lightning_clip.outputs import Embeddings, LossOutput


def pack_tokens(tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``[N, K, 1 + D]``: channel 0 is the real-token flag (1.0 / 0.0), then the L2-normalised token (0 on
    padding). One tensor per item side, so the retrieval metric can keep and gather it like an embedding."""
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    tokens = normalize(tokens.float()).masked_fill(~mask[..., None], 0.0)
    return torch.cat([mask[..., None].to(tokens.dtype), tokens], dim=-1)


def unpack_tokens(packed: Tensor) -> tuple[Tensor, Tensor]:
    return packed[..., 1:], packed[..., 0] > 0.5


_BLOCK = 1 << 22  # token products per block of the retrieval scores


def _masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim)


def token_similarity(image_tokens: Tensor, image_mask: Tensor, text_tokens: Tensor, text_mask: Tensor,
                     which: str = "both") -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(s^I, s^T)``, each ``[Ni, Nt]`` (image i, caption j), from tokens ``[Ni, R, D]``, ``[Nt, L, D]``
    and bool masks (True = real). ``which``: "image" or "text" computes only one (the other is None)."""
    x = image_tokens.masked_fill(~image_mask[..., None], 0.0)
    y = text_tokens.masked_fill(~text_mask[..., None], 0.0)
    sim = torch.einsum("ikd,jrd->ijkr", x, y)                                  # [Ni, Nt, R, L]
    s_image = s_text = None
    if which in ("both", "image"):
        best_word = sim.masked_fill(~text_mask[None, :, None, :], float("-inf")).amax(-1)   # [Ni, Nt, R]
        s_image = _masked_mean(best_word, image_mask[:, None, :], -1)
    if which in ("both", "text"):
        best_region = sim.masked_fill(~image_mask[:, None, :, None], float("-inf")).amax(-2)  # [Ni, Nt, L]
        s_text = _masked_mean(best_region, text_mask[None, :, :], -1)
    return s_image, s_text


@full_precision
def filip_terms(image_tokens: Tensor, image_mask: Optional[Tensor], text_tokens: Tensor,
                text_mask: Optional[Tensor], logit_scale, *, normalize_inputs: bool = False,
                gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: CE of the local image rows over s^I and of the local caption rows over s^T."""
    image_mask, text_mask = check_token_pair("filip", image_tokens, image_mask, text_tokens, text_mask,
                                             ("image_tokens", "image_mask", "text_tokens", "text_mask"))
    if normalize_inputs:
        image_tokens, text_tokens = normalize(image_tokens), normalize(text_tokens)
    labels = torch.arange(image_tokens.shape[0], device=image_tokens.device)
    if gathered and is_distributed():
        image_all, image_mask_all, offset = gather_tokens(image_tokens, image_mask)
        text_all, text_mask_all, _ = gather_tokens(text_tokens, text_mask)
        labels = labels + offset
        i2t = token_similarity(image_tokens, image_mask, text_all, text_mask_all, "image")[0]
        t2i = token_similarity(image_all, image_mask_all, text_tokens, text_mask, "text")[1].T
    else:
        s_image, s_text = token_similarity(image_tokens, image_mask, text_tokens, text_mask)
        i2t, t2i = s_image, s_text.T
    return {"i2t": F.cross_entropy(logit_scale * i2t, labels), "t2i": F.cross_entropy(logit_scale * t2i, labels)}


def filip(image_tokens: Tensor, image_mask: Optional[Tensor], text_tokens: Tensor, text_mask: Optional[Tensor],
          logit_scale) -> Tensor:
    """FILIP loss over L2-normalised tokens ``[N, R, D]`` / ``[N, L, D]`` with bool masks ``[N, R]`` /
    ``[N, L]`` (True = real; None = all real); ``logit_scale`` = exp(log_scale)."""
    terms = filip_terms(image_tokens, image_mask, text_tokens, text_mask, logit_scale)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("filip")
class FILIPLoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. Temperature as InfoNCE (init 1/0.07, learned). Needs the region and word
    heads; the pooled features are only validated. Retrieval ranks by the token-wise scores (module doc)."""

    needs = frozenset({"regions", "words"})

    def __init__(self, init_scale: float = 1 / 0.07, learn_scale: bool = True):
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)

    def retrieval_inputs(self, emb: Embeddings) -> tuple[Tensor, Tensor]:
        """Tokens (`pack_tokens`) for validation to keep; the pooled features when there are none."""
        if emb.regions is None or emb.words is None:
            return emb.image, emb.text
        return pack_tokens(emb.regions, emb.region_mask), pack_tokens(emb.words, emb.word_mask)

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None, direction: Optional[str] = None) -> Tensor:
        """[N_image, N_text]: s^I for ``direction="i2t"``, s^T for ``"t2i"``, their mean for None, from
        packed tokens ``[N, K, 1 + D]``; pooled ``[N, D]`` features fall back to their cosine."""
        if image.dim() == 2 and text.dim() == 2:
            return super().similarity(image, text)
        if direction not in (None, "i2t", "t2i"):
            raise ValueError(f"filip: direction must be 'i2t', 't2i' or None, got {direction!r}")
        (x, xm), (y, ym) = unpack_tokens(image.float()), unpack_tokens(text.float())
        which = {"i2t": "image", "t2i": "text", None: "both"}[direction]
        def score(a: slice, b: slice) -> Tensor:
            s_image, s_text = token_similarity(x[a], xm[a], y[b], ym[b], which)
            return s_image if which == "image" else s_text if which == "text" else (s_image + s_text) / 2

        return pairwise_blocks(score, x.shape[0], y.shape[0], x.shape[1] * y.shape[1], _BLOCK, x)

    def forward(self, emb: Embeddings) -> LossOutput:
        if emb.regions is None or emb.words is None:
            raise ValueError("filip: needs regions and words in the Embeddings (region/word heads)")
        check_pair("filip", emb.image, emb.text)
        terms = filip_terms(emb.regions, emb.region_mask, emb.words, emb.word_mask, self.logit_scale,
                            normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
