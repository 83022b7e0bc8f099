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
times sharper than the sentence ones). Option ``terms`` keeps one level only ("word", "sentence").

gamma3 is DAMSM's logit scale (1 / temperature of both levels). Fixed by default, as in AttnGAN; with
``learn_gamma3`` it is the base class's ``log_scale`` (init ln gamma3, clamped to [1, 100] after every
step, no weight decay), and either way `scalars` reports it as ``scale``, so it is logged as
``temperature/scale``.

Padding is honoured: padded words are left out of both softmaxes over words and of the pooling; padded
regions out of the softmax over regions. All N x N (image, caption) pairs are computed at once with
einsums; cos(c_l, e_l) is expanded through the region Gram matrix so that no [N, N, L, D] tensor is built
(memory N^2 * L * R).

Retrieval (option ``retrieval``) ranks by what the loss trains: "word" by R(a, b) alone, "sentence" (the
default, so that the `losses` runs, tuned and compared at the pooled cosine, keep their meaning; the
`damsm` ablation asks what ranking by R changes) by the pooled cosine, "both" by R + cos. Why that sum: the loss adds the two cross-entropies,
and CE(gamma3 R) + CE(gamma3 cos) is, up to a per-row constant, the cross-entropy of the normalised
product of the two softmaxes, whose logits are gamma3 (R + cos); gamma3 scales both and does not change a
ranking. R is one matrix for both directions (images rank captions and captions rank images by the same
R(a, b)), so ``direction`` is accepted and ignored. As with filip, `retrieval_inputs` makes validation
and evaluation keep every item's tokens, packed ``[N, K, 1 + D]`` (channel 0 the real-token flag, then the
*raw* feature: Eq. 8 uses unnormalised dot products); "both" puts the pooled feature in front as a row
flagged 2. `similarity` computes R blockwise (at most 2^22 word-region products per block).

Distributed: rows decompose (each CE row needs one item against all items), so a rank computes its images
against every caption and its captions against every image, with gathered (padded) regions and words.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, check_token_pair, full_precision, normalize, pairwise_blocks
from lightning_clip.losses._options import _option, choice, finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import LOG_SCALE_MAX, SCALE_MIN, ContrastiveLoss
from lightning_clip.losses.distributed import gather_tokens, is_distributed, split_rows
from lightning_clip.outputs import Embeddings, LossOutput

_EPS = 1e-8  # AttnGAN's cosine_similarity clamps the norm product at 1e-8
TERMS = ("word+sentence", "sentence", "word")
RETRIEVALS = ("word", "sentence", "both")
_LEVELS = {"word+sentence": {"word", "sentence"}, "sentence": {"sentence"}, "word": {"word"},
           "both": {"word", "sentence"}}  # what each option computes / ranks by
_BLOCK = 1 << 22  # word-region products per block of the retrieval scores (16 MiB per [a, b, L, R] tensor)
_SENTENCE_FLAG = 2.0  # channel 0 of the packed row that holds the pooled feature ("both")


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


def word_relevance_blocks(regions: Tensor, region_mask: Tensor, words: Tensor, word_mask: Tensor,
                          gamma1: float = 4.0, gamma2: float = 5.0, block: Optional[int] = None) -> Tensor:
    """`word_relevance` in blocks of pairs: each R(a, b) depends on its own pair only, so the blocks are
    exact; at most ``block`` (default `_BLOCK`) word-region products per block bound the memory for a whole
    validation set."""
    return pairwise_blocks(lambda a, b: word_relevance(regions[a], region_mask[a], words[b], word_mask[b],
                                                       gamma1, gamma2),
                           regions.shape[0], words.shape[0], regions.shape[1] * words.shape[1], block or _BLOCK,
                           regions)


def pack_tokens(tokens: Tensor, mask: Optional[Tensor], pooled: Optional[Tensor] = None) -> Tensor:
    """``[N, K, 1 + D]`` (``[N, 1 + K, 1 + D]`` with ``pooled``): channel 0 is the flag (1 real, 0 padding,
    2 the pooled feature), then the raw token, zeroed on padding so that garbage there cannot leak."""
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    lift = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731
    tokens = lift(tokens).masked_fill(~mask[..., None], 0.0)
    packed = torch.cat([mask[..., None].to(tokens.dtype), tokens], dim=-1)
    if pooled is not None:
        head = torch.cat([torch.full_like(pooled[:, :1], _SENTENCE_FLAG, dtype=tokens.dtype),
                          lift(pooled)], dim=-1)
        packed = torch.cat([head[:, None], packed], dim=1)
    return packed


def unpack_tokens(packed: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(tokens, mask, pooled or None)`` from `pack_tokens`' output."""
    flag = packed[:, 0, 0]
    if bool((flag > 1.5).all()):
        return packed[:, 1:, 1:], packed[:, 1:, 0] > 0.5, packed[:, 0, 1:]
    if bool((flag > 1.5).any()):
        raise ValueError("damsm: packed retrieval inputs mix items with and without a pooled row")
    return packed[..., 1:], packed[..., 0] > 0.5, None


@full_precision
def damsm_terms(regions: Optional[Tensor], region_mask: Optional[Tensor], words: Optional[Tensor],
                word_mask: Optional[Tensor], image: Optional[Tensor] = None, text: Optional[Tensor] = None, *,
                gamma1: float = 4.0, gamma2: float = 5.0, gamma3=10.0, terms: str = "word+sentence",
                gathered: bool = False) -> dict[str, Tensor]:
    """``{"word", "sentence"}``, each the sum of its two directions. ``terms``: "word" computes ``word``
    only, "sentence" ``sentence`` only (regions and words may then be None), "word+sentence" both
    (``sentence`` only when global ``image``/``text`` features are given). ``gamma3`` may be a tensor (a
    learned scale)."""
    choice("damsm", "terms", terms, TERMS)
    out = {}
    if "word" in _LEVELS[terms]:
        region_mask, word_mask = check_token_pair("damsm", regions, region_mask, words, word_mask,
                                                 ("regions", "region_mask", "words", "word_mask"))
        labels = torch.arange(regions.shape[0], device=regions.device)
        if gathered and is_distributed():
            regions_all, region_mask_all, offset = gather_tokens(regions, region_mask)
            words_all, word_mask_all, _ = gather_tokens(words, word_mask)
            labels = labels + offset
            i2t = word_relevance(regions, region_mask, words_all, word_mask_all, gamma1, gamma2)
            t2i = word_relevance(regions_all, region_mask_all, words, word_mask, gamma1, gamma2).T
        else:
            i2t = word_relevance(regions, region_mask, words, word_mask, gamma1, gamma2)
            t2i = i2t.T
        out["word"] = F.cross_entropy(gamma3 * i2t, labels) + F.cross_entropy(gamma3 * t2i, labels)
    if terms == "sentence" or (terms == "word+sentence" and (image is not None or text is not None)):
        check_pair("damsm", image, text)
        if regions is not None and image.shape[0] != regions.shape[0]:
            raise ValueError(f"damsm: {image.shape[0]} global features but {regions.shape[0]} region/word sets")
        rows = split_rows(normalize(image), normalize(text), gathered)
        s_i2t, s_t2i = rows.pairwise(lambda a, b: gamma3 * a @ b.T)
        out["sentence"] = F.cross_entropy(s_i2t, rows.labels) + F.cross_entropy(s_t2i, rows.labels)
    return out


def damsm(regions: Optional[Tensor], region_mask: Optional[Tensor], words: Optional[Tensor],
          word_mask: Optional[Tensor], *, gamma1: float = 4.0, gamma2: float = 5.0, gamma3=10.0,
          image: Optional[Tensor] = None, text: Optional[Tensor] = None, terms: str = "word+sentence") -> Tensor:
    """DAMSM loss: the word-level loss over regions ``[N, R, D]`` and words ``[N, L, D]`` (masks ``[N, R]``
    / ``[N, L]`` bool, None = all real), plus the sentence-level loss when the global ``image``/``text``
    ``[N, D]`` features are given (the module always gives them); ``terms`` as in `damsm_terms`."""
    out = damsm_terms(regions, region_mask, words, word_mask, image, text, gamma1=gamma1, gamma2=gamma2,
                      gamma3=gamma3, terms=terms)
    return sum(out.values())


@register_loss("damsm")
class DAMSMLoss(ContrastiveLoss):
    """Logs ``word`` and/or ``sentence`` (what ``terms`` computes) and gamma3 as ``scale``. The gammas are
    AttnGAN's smoothing factors (defaults 4, 5, 10); gamma3 is learned with ``learn_gamma3``. Validation
    and evaluation rank by ``retrieval`` (module doc)."""

    def __init__(self, gamma1: float = 4.0, gamma2: float = 5.0, gamma3: float = 10.0,
                 retrieval: str = "sentence", terms: str = "word+sentence", learn_gamma3: bool = False):
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            finite_number("damsm", name, value, above=0.0)
        choice("damsm", "retrieval", retrieval, RETRIEVALS)
        choice("damsm", "terms", terms, TERMS)
        if not isinstance(learn_gamma3, bool):
            raise ValueError(f"{_option('damsm', 'learn_gamma3')} must be true or false, got {learn_gamma3!r}")
        untrained = _LEVELS[retrieval] - _LEVELS[terms]
        if untrained:
            # ranking by features no term trains would measure their random initialisation
            raise ValueError(f"damsm: retrieval {retrieval!r} (option model.loss_args.retrieval) ranks by the "
                             f"{' and '.join(sorted(untrained))} level, which terms {terms!r} (option "
                             f"model.loss_args.terms) does not train; set retrieval to one of "
                             f"{tuple(r for r in RETRIEVALS if _LEVELS[r] <= _LEVELS[terms])}")
        if learn_gamma3 and not SCALE_MIN <= gamma3 <= math.exp(LOG_SCALE_MAX) * (1 + 1e-9):
            # clamp_ would move a learned gamma3 into [1, 100] after the first step
            raise ValueError(f"{_option('damsm', 'gamma3')} must be in [{SCALE_MIN:g}, {math.exp(LOG_SCALE_MAX):g}] "
                             f"(the range every optimizer step clamps a learned scale to) with learn_gamma3 "
                             f"true, got {gamma3!r}")
        # learned: the base class's log_scale (its clamp_, no_decay and scalars apply as they are); fixed: a
        # plain float, so a fixed-gamma3 checkpoint has the same state dict as before the option existed
        super().__init__(init_scale=gamma3 if learn_gamma3 else None)
        self.gamma1, self.gamma2 = gamma1, gamma2
        self._gamma3 = float(gamma3)
        self.retrieval, self.terms, self.learn_gamma3 = retrieval, terms, learn_gamma3
        # the sentence level alone uses only the pooled heads: do not build region/word heads nobody trains
        self.needs = frozenset({"regions", "words"}) if "word" in _LEVELS[terms] else frozenset()

    @property
    def gamma3(self) -> float:
        return float(self.logit_scale.detach()) if self.log_scale is not None else self._gamma3

    def scalars(self) -> dict[str, float]:
        """gamma3 as ``scale`` / ``log_scale`` (learned or fixed), so the temperature callback logs it."""
        return {"scale": self.gamma3, "log_scale": math.log(self.gamma3)}

    def retrieval_inputs(self, emb: Embeddings) -> tuple[Tensor, Tensor]:
        """Packed tokens (`pack_tokens`; "both" with the pooled row) for "word"/"both", the pooled features
        for "sentence" or when there are no tokens."""
        if self.retrieval == "sentence" or emb.regions is None or emb.words is None:
            return emb.image, emb.text
        both = self.retrieval == "both"
        return (pack_tokens(emb.regions, emb.region_mask, emb.image if both else None),
                pack_tokens(emb.words, emb.word_mask, emb.text if both else None))

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None, direction: Optional[str] = None) -> Tensor:
        """[N_image, N_text]: R(a, b) from packed tokens, plus the pooled cosine where the packs carry the
        pooled row ("both"); pooled ``[N, D]`` features fall back to their cosine. ``direction`` is
        ignored: one R serves both directions."""
        if image.dim() == 2 and text.dim() == 2:
            return super().similarity(image, text)
        if image.dim() != 3 or text.dim() != 3:
            raise ValueError(f"damsm: similarity takes two packed [N, K, 1 + D] or two pooled [N, D] tensors, "
                             f"got {tuple(image.shape)} and {tuple(text.shape)}")
        (x, xm, xp), (y, ym, yp) = unpack_tokens(image), unpack_tokens(text)
        if (xp is None) != (yp is None):
            raise ValueError("damsm: only one side of the packed retrieval inputs carries the pooled row")
        lift = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731
        scores = word_relevance_blocks(lift(x), xm, lift(y), ym, self.gamma1, self.gamma2)
        if xp is not None:
            scores = scores + normalize(lift(xp)) @ normalize(lift(yp)).T  # cosine_similarity, dtype kept
        return scores

    def forward(self, emb: Embeddings) -> LossOutput:
        if "word" in _LEVELS[self.terms] and (emb.regions is None or emb.words is None):
            raise ValueError("damsm: needs regions and words in the Embeddings (region/word heads)")
        gamma3 = self._gamma3
        if self.log_scale is not None:  # float32 as the base's logit_scale, but a float64 module stays float64
            gamma3 = self.log_scale.exp() if self.log_scale.dtype == torch.float64 else self.logit_scale
        terms = damsm_terms(emb.regions, emb.region_mask, emb.words, emb.word_mask, emb.image, emb.text,
                            gamma1=self.gamma1, gamma2=self.gamma2, gamma3=gamma3, terms=self.terms, gathered=True)
        return LossOutput(sum(terms.values()), terms)
