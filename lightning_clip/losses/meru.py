"""MERU: hyperbolic image-text contrastive learning with entailment cones (Desai et al. ICML 2023,
"Hyperbolic Image-Text Representations"; facebookresearch/meru).

The raw projected features x are scaled by a learned alpha per modality and lifted onto the Lorentz
hyperboloid of curvature -c by the exponential map at the origin,

    v = expmap0(alpha x) = sinh(sqrt(c) |alpha x|) alpha x / (sqrt(c) |alpha x|),   t(v) = sqrt(1/c + |v|^2),
    d_ij = arccosh(-c (v_i . w_j - t(v_i) t(w_j))) / sqrt(c),

and the contrastive part is CLIP's with logits -s d (images v as rows, captions w as columns). The
entailment part asks each caption's cone, of half-aperture arcsin(2K / (sqrt(c) |w|)), to hold its image:
L_e = mean_i max(0, ext(w_i, v_i) - aper(w_i)). The aperture shrinks as a caption moves away from the
origin, so a vague caption, true of many images, has to sit nearer the origin than a specific one.

The hyperbolic arithmetic runs in float64: the clamps at 1 + 1e-8 and 1 - 1e-8 vanish in float32 (whose
spacing at 1 is 1.2e-7), where arccosh and arcsin would then meet their infinite slope, and at |v| near
2^15 the Lorentz inner product is a difference of two numbers near 2^30.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clip.losses._inputs import check_pair, full_precision
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput

EPS = 1e-8
SINH_MAX = math.asinh(2.0 ** 15)


def _as_tensor(x, like: Tensor) -> Tensor:
    return x.to(like.device, like.dtype) if torch.is_tensor(x) else torch.tensor(float(x), dtype=like.dtype,
                                                                                 device=like.device)


def expmap0(x: Tensor, curv: Tensor) -> Tensor:
    """The space part of the point of the hyperboloid that the tangent vector ``x`` at the origin reaches."""
    rc_norm = curv.sqrt() * x.norm(dim=-1, keepdim=True)
    return torch.sinh(rc_norm.clamp(EPS, SINH_MAX)) * x / rc_norm.clamp_min(EPS)


def time_part(v: Tensor, curv: Tensor) -> Tensor:
    return torch.sqrt(1 / curv + (v * v).sum(-1))


def pairwise_distance(v: Tensor, w: Tensor, curv: Tensor) -> Tensor:
    """Geodesic distances ``[len(v), len(w)]`` between hyperboloid points given by their space parts."""
    inner = v @ w.T - time_part(v, curv)[:, None] * time_part(w, curv)[None, :]
    return torch.acosh((-curv * inner).clamp_min(1 + EPS)) / curv.sqrt()


def half_aperture(w: Tensor, curv: Tensor, min_radius: float) -> Tensor:
    return torch.asin((2 * min_radius / (w.norm(dim=-1) * curv.sqrt() + EPS)).clamp(-1 + EPS, 1 - EPS))


def exterior_angle(w: Tensor, v: Tensor, curv: Tensor) -> Tensor:
    """The angle at ``w`` between the geodesic from the origin through ``w`` and the one from ``w`` to ``v``
    (row by row)."""
    t_w, t_v = time_part(w, curv), time_part(v, curv)
    c_wv = curv * ((w * v).sum(-1) - t_w * t_v)
    numer = t_v + c_wv * t_w
    denom = w.norm(dim=-1) * torch.sqrt((c_wv * c_wv - 1).clamp_min(EPS)) + EPS
    return torch.acos((numer / denom).clamp(-1 + EPS, 1 - EPS))


def lift(x: Tensor, log_alpha, curv: Tensor) -> Tensor:
    """Raw features -> float64 hyperboloid space parts."""
    x = x.double()
    return expmap0(_as_tensor(log_alpha, x).exp() * x, curv)


def _check(image, text, min_radius) -> None:
    check_pair("meru", image, text)
    finite_number("meru", "min_radius", min_radius, above=0)


@full_precision
def meru_terms(image: Tensor, text: Tensor, logit_scale, image_log_alpha, text_log_alpha, log_curv, *,
               min_radius: float = 0.1, gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i", "entailment"}`` over the local rows (in the features' dtype); the loss is
    (i2t + t2i) / 2 + entail_weight * entailment."""
    _check(image, text, min_radius)
    dtype = image.dtype
    curv = _as_tensor(log_curv, image.double()).exp()
    v, w = lift(image, image_log_alpha, curv), lift(text, text_log_alpha, curv)
    rows = split_rows(v, w, gathered)
    s = _as_tensor(logit_scale, v)
    i2t, t2i = rows.pairwise(lambda a, b: -s * pairwise_distance(a, b, curv))
    labels = rows.labels
    entail = (exterior_angle(w, v, curv) - half_aperture(w, curv, min_radius)).clamp_min(0).mean()
    return {"i2t": F.cross_entropy(i2t, labels).to(dtype), "t2i": F.cross_entropy(t2i, labels).to(dtype),
            "entailment": entail.to(dtype)}


def meru(image: Tensor, text: Tensor, logit_scale, image_log_alpha, text_log_alpha, log_curv,
         entail_weight: float = 0.2, min_radius: float = 0.1) -> Tensor:
    """MERU's loss on the *raw, unnormalised* projected features ``[N, D]``; ``logit_scale`` is the
    multiplier s, the alphas and the curvature c are given by their logs."""
    finite_number("meru", "entail_weight", entail_weight, at_least=0)
    terms = meru_terms(image, text, logit_scale, image_log_alpha, text_log_alpha, log_curv, min_radius=min_radius)
    return (terms["i2t"] + terms["t2i"]) / 2 + entail_weight * terms["entailment"]


@register_loss("meru")
class MeruLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` (the contrastive halves) and ``entailment`` (before its weight). Owns log alpha
    per modality (initialised to -1/2 ln D at the first forward, when D is known; clamped <= 0 after each
    step), log c (learned from ``init_curv``, clamped to [ln(c0/10), ln(10 c0)]) and the log-scale.
    Retrieval ranks by -d; `origin_distance` gives a caption's distance from the origin (the variance
    callback logs it per specificity level)."""

    no_decay = ("log_scale", "bias", "image_log_alpha", "text_log_alpha", "log_curv")

    def __init__(self, entail_weight: float = 0.2, min_radius: float = 0.1, init_curv: float = 1.0,
                 learn_curv: bool = True, init_scale: float = 1 / 0.07, learn_scale: bool = True):
        finite_number("meru", "entail_weight", entail_weight, at_least=0)
        finite_number("meru", "min_radius", min_radius, above=0)
        finite_number("meru", "init_curv", init_curv, above=0)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.entail_weight, self.min_radius, self.init_curv = entail_weight, min_radius, init_curv
        self.log_curv = nn.Parameter(torch.tensor(math.log(init_curv)), requires_grad=learn_curv)
        self.image_log_alpha = nn.Parameter(torch.tensor(0.0))
        self.text_log_alpha = nn.Parameter(torch.tensor(0.0))
        # in the state dict: a resumed run keeps its learned alphas
        self.register_buffer("alpha_initialized", torch.tensor(False))
        self._alpha_checked = False

    @torch.no_grad()
    def _init_alpha(self, dim: int) -> None:
        if not self._alpha_checked:
            if not bool(self.alpha_initialized):
                self.image_log_alpha.fill_(-0.5 * math.log(dim))
                self.text_log_alpha.fill_(-0.5 * math.log(dim))
                self.alpha_initialized.fill_(True)
            self._alpha_checked = True

    @torch.no_grad()
    def clamp_(self) -> None:
        super().clamp_()
        self.image_log_alpha.clamp_(max=0.0)
        self.text_log_alpha.clamp_(max=0.0)
        self.log_curv.clamp_(math.log(self.init_curv / 10), math.log(self.init_curv * 10))

    def scalars(self) -> dict[str, float]:
        out = super().scalars()
        out["curv"] = math.exp(float(self.log_curv.detach()))
        out["image_alpha"] = math.exp(float(self.image_log_alpha.detach()))
        out["text_alpha"] = math.exp(float(self.text_log_alpha.detach()))
        return out

    def forward(self, emb: Embeddings) -> LossOutput:
        _check(emb.image, emb.text, self.min_radius)
        self._init_alpha(emb.image.shape[1])
        terms = meru_terms(emb.image, emb.text, self.logit_scale, self.image_log_alpha, self.text_log_alpha,
                           self.log_curv, min_radius=self.min_radius, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2 + self.entail_weight * terms["entailment"], terms)

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None) -> Tensor:
        """-d_ij: the score MERU trains with."""
        self._init_alpha(image.shape[-1])
        curv = self.log_curv.detach().double().exp()
        v, w = lift(image, self.image_log_alpha.detach(), curv), lift(text, self.text_log_alpha.detach(), curv)
        return (-pairwise_distance(v, w, curv)).float()

    @torch.no_grad()
    def origin_distance(self, text: Tensor) -> Tensor:
        """Each caption's geodesic distance from the origin ``[N]``: arccosh(sqrt(c) t(w)) / sqrt(c)."""
        self._init_alpha(text.shape[-1])
        curv = self.log_curv.detach().double().exp()
        w = lift(text, self.text_log_alpha.detach(), curv)
        return (torch.acosh((curv.sqrt() * time_part(w, curv)).clamp_min(1.0)) / curv.sqrt()).float()
