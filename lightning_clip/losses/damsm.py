"""DAMSM, the Deep Attentional Multimodal Similarity Model loss of AttnGAN (Xu et al. 2018, "AttnGAN:
Fine-Grained Text to Image Generation with Attentional GANs"; seed 003 asks how its matching loss maps to
cross-entropy labels: class indices arange(N), equivalently identity-matrix probability targets).

Word level, for image a with regions v_r (r <= R) and caption b with words e_l (l <= L):

    s_lr   = e_l . v_r                                  (raw dot products)
    sbar   = softmax over words l of s                  (Eq. 8: each region is normalised over the words)
    alpha  = softmax over regions r of gamma1 * sbar    (Eq. 9)
    c_l    = sum_r alpha_lr v_r                         (region context of word l)
    R(a,b) = (1/gamma2) log sum_l exp(gamma2 cos(c_l, e_l))   (Eq. 10, log-sum-exp pooling)
    L_word = CE(gamma3 R, arange N) over captions + the same over images

Sentence level: L_sent = CE(gamma3 cos(I_a, T_b)) in both directions. The loss is
L_word + L_sent, each the *sum* of its two directions as in AttnGAN's training code
(``w_loss0 + w_loss1 + s_loss0 + s_loss1``, each a batch-mean cross-entropy); the paper's Eq. 10 has the
1/gamma2 that the released code leaves out, and it is kept here (without it the word logits are gamma2
times sharper than the sentence ones).

Padding is honoured: padded words are left out of both softmaxes over words and of the pooling; padded
regions out of the softmax over regions. All N x N (image, caption) pairs are computed at once with
einsums; cos(c_l, e_l) is expanded through the region Gram matrix so that no [N, N, L, D] tensor is built
(memory N^2 * L * R).

Distributed: rows decompose (each CE row needs one item against all items), so a rank computes its images
against every caption and its captions against every image, with gathered (padded) regions and words.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, check_token_pair, full_precision, normalize
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather_tokens, is_distributed, split_rows
from lightning_clip.outputs import Embeddings, LossOutput

_EPS = 1e-8  # AttnGAN's cosine_similarity clamps the norm product at 1e-8


def word_relevance(regions: Tensor, region_mask: Tensor, words: Tensor, word_mask: Tensor,
                   gamma1: float = 4.0, gamma2: float = 5.0) -> Tensor:
    """R(image a, caption b) for every pair: ``[Na, Nb]`` from regions ``[Na, R, D]`` and words
    ``[Nb, L, D]`` with bool masks (True = real)."""
    s = torch.einsum("bld,ard->ablr", words, regions)                      # [Na, Nb, L, R]
    wmask = word_mask[None, :, :, None]
    sbar = torch.softmax(s.masked_fill(~wmask, float("-inf")), dim=2)      # Eq. 8, over words
    sbar = sbar.masked_fill(~wmask, 0.0)  # rows of a padded word are not used; keep them finite
    alpha = torch.softmax((gamma1 * sbar).masked_fill(~region_mask[:, None, None, :], float("-inf")),
                          dim=3)                                           # Eq. 9, over regions
    dot = (alpha * s).sum(-1)                                              # c_l . e_l   [Na, Nb, L]
    gram = torch.einsum("ard,asd->ars", regions, regions)                  # [Na, R, R]
    c_sq = torch.einsum("ablr,ars,abls->abl", alpha, gram, alpha)          # ||c_l||^2
    e_norm = words.norm(dim=-1)[None]                                      # [1, Nb, L]
    cos = dot / (c_sq.clamp_min(0).sqrt() * e_norm).clamp_min(_EPS)
    pooled = torch.logsumexp((gamma2 * cos).masked_fill(~word_mask[None], float("-inf")), dim=2)
    return pooled / gamma2                                                 # Eq. 10


@full_precision
def damsm_terms(regions: Tensor, region_mask: Optional[Tensor], words: Tensor, word_mask: Optional[Tensor],
                image: Optional[Tensor] = None, text: Optional[Tensor] = None, *, gamma1: float = 4.0,
                gamma2: float = 5.0, gamma3: float = 10.0, gathered: bool = False) -> dict[str, Tensor]:
    """``{"word", "sentence"}`` (``sentence`` only when global ``image``/``text`` features are given),
    each the sum of its two directions."""
    region_mask, word_mask = check_token_pair("damsm", regions, region_mask, words, word_mask,
                                             ("regions", "region_mask", "words", "word_mask"))
    n = regions.shape[0]
    labels = torch.arange(n, device=regions.device)
    if gathered and is_distributed():
        regions_all, region_mask_all, offset = gather_tokens(regions, region_mask)
        words_all, word_mask_all, _ = gather_tokens(words, word_mask)
        labels = labels + offset
        i2t = word_relevance(regions, region_mask, words_all, word_mask_all, gamma1, gamma2)
        t2i = word_relevance(regions_all, region_mask_all, words, word_mask, gamma1, gamma2).T
    else:
        i2t = word_relevance(regions, region_mask, words, word_mask, gamma1, gamma2)
        t2i = i2t.T
    terms = {"word": F.cross_entropy(gamma3 * i2t, labels) + F.cross_entropy(gamma3 * t2i, labels)}
    if image is not None or text is not None:
        check_pair("damsm", image, text)
        if image.shape[0] != n:
            raise ValueError(f"damsm: {image.shape[0]} global features but {n} region/word sets")
        rows = split_rows(normalize(image), normalize(text), gathered)
        s_i2t, s_t2i = rows.pairwise(lambda a, b: gamma3 * a @ b.T)
        terms["sentence"] = F.cross_entropy(s_i2t, rows.labels) + F.cross_entropy(s_t2i, rows.labels)
    return terms


def damsm(regions: Tensor, region_mask: Optional[Tensor], words: Tensor, word_mask: Optional[Tensor], *,
          gamma1: float = 4.0, gamma2: float = 5.0, gamma3: float = 10.0, image: Optional[Tensor] = None,
          text: Optional[Tensor] = None) -> Tensor:
    """DAMSM loss: the word-level loss over regions ``[N, R, D]`` and words ``[N, L, D]`` (masks ``[N, R]``
    / ``[N, L]`` bool, None = all real), plus the sentence-level loss when the global ``image``/``text``
    ``[N, D]`` features are given (the module always gives them)."""
    terms = damsm_terms(regions, region_mask, words, word_mask, image, text, gamma1=gamma1, gamma2=gamma2,
                        gamma3=gamma3)
    return sum(terms.values())


@register_loss("damsm")
class DAMSMLoss(ContrastiveLoss):
    """Logs ``sentence`` and ``word``. No learned temperature: the gammas are AttnGAN's fixed smoothing
    factors (defaults 4, 5, 10)."""

    needs = frozenset({"regions", "words"})

    def __init__(self, gamma1: float = 4.0, gamma2: float = 5.0, gamma3: float = 10.0):
        super().__init__()
        self.gamma1, self.gamma2, self.gamma3 = gamma1, gamma2, gamma3

    def forward(self, emb: Embeddings) -> LossOutput:
        if emb.regions is None or emb.words is None:
            raise ValueError("damsm: needs regions and words in the Embeddings (region/word heads)")
        terms = damsm_terms(emb.regions, emb.region_mask, emb.words, emb.word_mask, emb.image, emb.text,
                            gamma1=self.gamma1, gamma2=self.gamma2, gamma3=self.gamma3, gathered=True)
        return LossOutput(terms["sentence"] + terms["word"], terms)
