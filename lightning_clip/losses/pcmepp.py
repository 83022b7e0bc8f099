"""PCME++ (Chun 2024, "Improved Probabilistic Image-Text Representations"; naver-ai/pcmepp): each item is a
Gaussian N(mu, diag(sigma^2)); a pair's match probability is a sigmoid of their closed-form sampled distance.

    d_ij     = ||mu^I_i - mu^T_j||^2 + sum_d (sigma^I_{i,d}^2 + sigma^T_{j,d}^2)   (E ||z^I - z^T||^2)
    logit_ij = -a d_ij + b,   a, b learned (raw values, initialised 5 and 5)
    L = mean over all N^2 pairs of BCE(logit_ij, [i == j])
        + vib_beta * (KL(N(mu^I, sigma^I^2) || N(0, I)) + KL(text)) / 2

each KL summed over dimensions and averaged over samples: KL = 0.5 sum_d (mu_d^2 + sigma_d^2 - 1 - 2 ln sigma_d).
ln sigma is ``[N]`` (isotropic: one sigma on every dimension, what the module's variance heads give, so
the sum over d is D sigma^2) or ``[N, D]`` (per dimension, as in the paper; functional only).

Deviations, both to share the probabilistic family's variance heads and callback: ln sigma is clamped to
[LN_STD_MIN, LN_STD_MAX] = [-5, 5] like `probabilistic` (no gradient outside; sigma^2 <= e^10 keeps every
logit finite), and the means are L2-normalised by the module (``normalize=True``, as PCME++'s encoders
do). The paper's pseudo-positives (PP) are not implemented.

Retrieval ranks by -d_ij (`similarity`), the distance the loss trains. The variance heads feed the
`VarianceCallback` like `probabilistic` (it applies to any family whose ``needs`` has a log-std).

Distributed: every pair's BCE term is independent and the mean over N^2 pairs is a mean over image rows
of a mean over caption columns, so a rank's image rows against the gathered captions (and their
log-stds) are exactly its share; the VIB term is a per-sample mean. Not tiled: the N x N matrix of a
single BCE is what SigLIP's kernel tiles, but with per-pair variances added; not done.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import _require_finite, check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather, split_rows
from lightning_clip.losses.probabilistic import LN_STD_MAX, LN_STD_MIN, retrieval_inputs, squared_distances
from lightning_clip.outputs import Embeddings, LossOutput


def _check_ln_std(name: str, ln_std: Tensor, n: int, d: int) -> None:
    if ln_std is None:
        raise ValueError("pcmepp: needs image_ln_std and text_ln_std (the variance heads)")
    if not isinstance(ln_std, Tensor) or tuple(ln_std.shape) not in ((n,), (n, d)):
        raise ValueError(f"pcmepp: {name} must have shape [N] = [{n}] (isotropic) or [N, D] = [{n}, {d}], got "
                         f"{tuple(ln_std.shape) if isinstance(ln_std, Tensor) else type(ln_std).__name__}")
    _require_finite({name: ln_std}, "pcmepp")


def _variance_sum(ln_std: Tensor, dim: int) -> Tensor:
    """sum_d sigma_d^2 per item ``[N]`` from a clamped ln sigma ``[N]`` or ``[N, D]``."""
    var = torch.exp(2 * ln_std.clamp(LN_STD_MIN, LN_STD_MAX))
    return dim * var if var.dim() == 1 else var.sum(-1)


def _kl(mu: Tensor, ln_std: Tensor) -> Tensor:
    """Mean over items of KL(N(mu, sigma^2) || N(0, I)), summed over dimensions."""
    dim = mu.shape[1]
    ln_std = ln_std.clamp(LN_STD_MIN, LN_STD_MAX)
    log_sum = dim * ln_std if ln_std.dim() == 1 else ln_std.sum(-1)
    return (0.5 * ((mu * mu).sum(-1) + _variance_sum(ln_std, dim) - dim) - log_sum).mean()


def sampled_distances(image: Tensor, text: Tensor, image_var_sum: Tensor, text_var_sum: Tensor) -> Tensor:
    """d_ij ``[Ni, Nt]`` from means and the per-item sums of the variances."""
    return squared_distances(image, text) + image_var_sum[:, None] + text_var_sum[None, :]


@full_precision
def pcmepp_terms(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor, a, b, *,
                 normalize_inputs: bool = False, gathered: bool = False) -> dict[str, Tensor]:
    """``{"bce", "vib"}``: the BCE over the local image rows against every caption (divided by B * N),
    and the VIB term (KL_image + KL_text) / 2 over the local items, before ``vib_beta``."""
    n = check_pair("pcmepp", image, text)
    d = image.shape[1]
    _check_ln_std("image_ln_std", image_ln_std, n, d)
    _check_ln_std("text_ln_std", text_ln_std, n, d)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    text_std_all = text_ln_std if rows.local else gather(text_ln_std)[0]
    dist = sampled_distances(rows.image, rows.text_all, _variance_sum(image_ln_std, d), _variance_sum(text_std_all, d))
    logits = -a * dist + b
    targets = torch.zeros_like(logits)
    targets[torch.arange(logits.shape[0], device=logits.device), rows.labels] = 1.0
    return {"bce": F.binary_cross_entropy_with_logits(logits, targets),
            "vib": (_kl(image, image_ln_std) + _kl(text, text_ln_std)) / 2}


def pcmepp(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor, a, b,
           vib_beta: float = 0.0) -> Tensor:
    """PCME++ on means ``[N, D]`` (used as given) and log-stds ``[N]`` or ``[N, D]``; ``a``, ``b`` the
    raw (not log) affine parameters of the logit -a d + b."""
    terms = pcmepp_terms(image, text, image_ln_std, text_ln_std, a, b)
    return terms["bce"] + vib_beta * terms["vib"]


@register_loss("pcmepp")
class PCMEPPLoss(ContrastiveLoss):
    """Logs ``bce``, ``vib`` (the KL term before ``vib_beta``) and the mean predicted log-std of each side
    (``image_ln_std``, ``text_ln_std``); the temperature callback logs ``a`` as ``temperature/scale`` and
    ``b`` as ``temperature/bias``."""

    needs = frozenset({"image_ln_std", "text_ln_std"})
    no_decay = ("a", "b")

    def __init__(self, init_a: float = 5.0, init_b: float = 5.0, learn_ab: bool = True, vib_beta: float = 0.0,
                 normalize: bool = True):
        super().__init__()
        finite_number("pcmepp", "vib_beta", vib_beta, at_least=0)
        self.a = torch.nn.Parameter(torch.tensor(float(init_a)), requires_grad=learn_ab)
        self.b = torch.nn.Parameter(torch.tensor(float(init_b)), requires_grad=learn_ab)
        self.vib_beta = float(vib_beta)
        self.normalize = normalize

    def scalars(self) -> dict[str, float]:
        """``a`` and ``b``, also as ``scale`` and ``bias`` (they are the logit's scale and bias), which is
        what the temperature callback logs."""
        a, b = float(self.a.detach()), float(self.b.detach())
        return {"a": a, "b": b, "scale": a, "bias": b}

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = pcmepp_terms(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, self.a.float(),
                             self.b.float(), normalize_inputs=self.normalize, gathered=True)
        loss = terms["bce"] + self.vib_beta * terms["vib"]
        if emb.image_ln_std is not None:
            terms["image_ln_std"] = emb.image_ln_std.detach().float().mean()
            terms["text_ln_std"] = emb.text_ln_std.detach().float().mean()
        return LossOutput(loss, terms)

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None) -> Tensor:
        """-d_ij (missing log-stds count as 0, i.e. sigma = 1)."""
        image, text, iv, tv = retrieval_inputs(image, text, image_ln_std, text_ln_std, self.normalize)
        d = image.shape[1]
        return -sampled_distances(image, text, _variance_sum(iv, d), _variance_sum(tv, d))
