"""Per-sample variance (seed 000: a proposal on the openai/CLIP issue tracker, "Just a loss function for
discussion"). Two heads predict a log standard deviation per image and per caption; a vaguer caption
("a dog in the garden") should get a larger variance than a specific one ("a shiba dog in the garden").

With d_ij = ||I_i - T_j||^2 and sigma = exp(ln_std):

    mode "proposal" (the seed's PyTorch `my_loss`, exactly):
        i2t (image rows, over captions j):  logit_ij = -ln_std^T_j - d_ij / sigma^T_j^2
        t2i (caption rows, over images i):  logit_ji = -ln_std^I_i - d_ij / sigma^I_i^2
    mode "gaussian" (the isotropic Gaussian log-likelihood in D dimensions, up to a constant):
        logit = -D ln_std - d / (2 sigma^2)
    (``gaussian_dims`` replaces the D multiplying ln_std, e.g. 1 to test whether that term is what sets
    the sign of the variance/specificity correlation; None keeps D, the embedding width)
    L = (CE(i2t, arange N) + CE(t2i, arange N)) / 2

Slips in the seed's pseudocode (mode "proposal" keeps the PyTorch version's maths, which is the
self-consistent one):

- numpy: the distances are taken between the encoder features ``I_f``/``T_f`` instead of the joint
  embeddings ``I_e``/``T_e`` (widths d_i and d_t differ, so it would not even broadcast); the PyTorch
  version names its embedding argument ``I_f`` as well. Here the distances are on the embeddings.
- numpy: it computes ``distances_sq`` and then uses ``distances``; it defines ``labels`` and uses
  ``label``; ``np.expand_dims(T_f, dim=0)`` uses torch's keyword where numpy's is ``axis``.
- numpy: the variances are shaped by hand ([n, 1] for images, [1, n] for captions) and each
  ``cross_entropy_loss(..., axis=...)`` must softmax along the axis its variance varies on (axis 0 for
  images, 1 for captions); swapping either axis turns the variance into a per-row constant that
  cancels in the softmax. The PyTorch version gets the same pairing with both log-stds as row vectors
  [1, n] and ``distances.t()`` for the image term, which is easy to misread: its comment says [1, n]
  for ``I_ln_std`` too, and it only works because of the transpose.

The log-std is clamped to [LN_STD_MIN, LN_STD_MAX] = [-5, 5] before use: sigma in [0.0067, 148], so with
normalised embeddings (d <= 4) the logits stay below 4 e^10 ~ 9e4 in magnitude and no exp or division can
overflow; outside the range the head gets no gradient (it is told to stay inside).

Retrieval ranks by the likelihood logits the loss trains with. The retrieval metric takes one [N_image,
N_text] score matrix for both directions, so `similarity` returns the mean of the two directional
logits (i2t with the caption's variance, t2i with the image's).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_variance_pair, full_precision, normalize
from lightning_clip.losses._options import choice, finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather, split_rows
from lightning_clip.outputs import Embeddings, LossOutput

MODES = ("proposal", "gaussian")


def directions_with_variance(terms: dict, emb: Embeddings) -> LossOutput:
    """The mean of the ``i2t`` and ``t2i`` terms as the loss, with the mean predicted log-std of each side
    logged beside them (the families whose heads predict one: this one, sample_temperature)."""
    terms["image_ln_std"] = emb.image_ln_std.detach().float().mean()
    terms["text_ln_std"] = emb.text_ln_std.detach().float().mean()
    return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
LN_STD_MIN, LN_STD_MAX = -5.0, 5.0


def _check_mode(mode: str) -> None:
    choice("probabilistic", "mode", mode, MODES)


def _check_dims(gaussian_dims, mode: str) -> None:
    if gaussian_dims is None:
        return
    if mode != "gaussian":
        raise ValueError(f"probabilistic: gaussian_dims={gaussian_dims!r} (option model.loss_args.gaussian_dims) "
                         f"applies only to mode='gaussian', got mode={mode!r}")
    finite_number("probabilistic", "gaussian_dims", gaussian_dims, at_least=0,
                  alternatives=" or None (the embedding width)")


def retrieval_inputs(image: Tensor, text: Tensor, image_ln_std: Optional[Tensor],
                     text_ln_std: Optional[Tensor], normalize_inputs: bool):
    """What a log-std family's `similarity` scores: float32 features (L2-normalised when the family
    normalises) and float32 log-stds, a missing one counting as 0 (sigma = 1)."""
    image, text = image.float(), text.float()
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    image_ln_std = image.new_zeros(image.shape[0]) if image_ln_std is None else image_ln_std.float()
    text_ln_std = text.new_zeros(text.shape[0]) if text_ln_std is None else text_ln_std.float()
    return image, text, image_ln_std, text_ln_std


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """[Na, Nb] squared Euclidean distances, by the expansion (no [Na, Nb, D] intermediate)."""
    return (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2 * a @ b.T


def _logits(d: Tensor, ln_std: Tensor, mode: str, dim: int) -> Tensor:
    """Likelihood logits from distances ``d`` and the log-std of the *candidates* (broadcast [1, N])."""
    ln_std = ln_std.clamp(LN_STD_MIN, LN_STD_MAX)[None, :]
    var = torch.exp(2 * ln_std)
    if mode == "proposal":
        return -ln_std - d / var
    return -dim * ln_std - d / (2 * var)


@full_precision
def probabilistic_terms(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor, *,
                        mode: str = "proposal", normalize_inputs: bool = False,
                        gathered: bool = False, gaussian_dims: Optional[float] = None) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: cross-entropy of the image rows (caption variances) and of the caption rows
    (image variances). ``gaussian_dims``: the factor of ln_std in mode "gaussian" (None: D)."""
    _check_mode(mode)
    _check_dims(gaussian_dims, mode)
    check_variance_pair("probabilistic", image, text, image_ln_std, text_ln_std)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    if rows.local:
        image_std_all, text_std_all = image_ln_std, text_ln_std
        d = squared_distances(image, text)
        d_i2t, d_t2i = d, d.T
    else:
        image_std_all, text_std_all = gather(image_ln_std)[0], gather(text_ln_std)[0]
        d_i2t = squared_distances(rows.image, rows.text_all)
        d_t2i = squared_distances(rows.text, rows.image_all)
    dim = image.shape[1] if gaussian_dims is None else gaussian_dims
    labels = rows.labels
    return {"i2t": F.cross_entropy(_logits(d_i2t, text_std_all, mode, dim), labels),
            "t2i": F.cross_entropy(_logits(d_t2i, image_std_all, mode, dim), labels)}


def probabilistic(image: Tensor, text: Tensor, image_ln_std: Tensor, text_ln_std: Tensor, *,
                  mode: str = "proposal", gaussian_dims: Optional[float] = None) -> Tensor:
    """The variance-aware loss on ``[N, D]`` embeddings (used as given) and log-stds ``[N]``."""
    terms = probabilistic_terms(image, text, image_ln_std, text_ln_std, mode=mode, gaussian_dims=gaussian_dims)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("probabilistic")
class ProbabilisticLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` and the mean predicted log-std of each side (``image_ln_std``,
    ``text_ln_std``). ``normalize``: L2-normalise the embeddings first (default; distances then lie in
    [0, 4] and the variance alone sets the sharpness, so there is no separate temperature).
    ``gaussian_dims`` (mode "gaussian" only): the factor of ln_std in the logit; None = the embedding width."""

    needs = frozenset({"image_ln_std", "text_ln_std"})

    def __init__(self, mode: str = "proposal", normalize: bool = True, gaussian_dims: Optional[float] = None):
        _check_mode(mode)
        _check_dims(gaussian_dims, mode)
        super().__init__()
        self.mode = mode
        self.normalize = normalize
        self.gaussian_dims = gaussian_dims

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = probabilistic_terms(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, mode=self.mode,
                                    normalize_inputs=self.normalize, gathered=True,
                                    gaussian_dims=self.gaussian_dims)
        return directions_with_variance(terms, emb)

    @torch.no_grad()
    def similarity(self, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor] = None,
                   text_ln_std: Optional[Tensor] = None) -> Tensor:
        image, text, image_ln_std, text_ln_std = retrieval_inputs(image, text, image_ln_std, text_ln_std,
                                                                  self.normalize)
        d = squared_distances(image, text)
        dim = image.shape[1] if self.gaussian_dims is None else self.gaussian_dims
        i2t = _logits(d, text_ln_std, self.mode, dim)
        t2i = _logits(d.T, image_ln_std, self.mode, dim).T
        return (i2t + t2i) / 2
