"""CLOOB (Fuerst et al. 2022, "CLOOB: Modern Hopfield Networks with InfoLOOB Outperform CLIP";
ml-jku/cloob): the embeddings are first replaced by what a modern Hopfield network retrieves from the
batch, then contrasted with the leave-one-out bound InfoLOOB.

    R(Q, M)_i = normalize( sum_j softmax_j(beta_h Q_i.M_j) M_j )          (retrieval from memory M)
    U_xx = R(I, I),  U_xy = R(T, I),  U_yy = R(T, T),  U_yx = R(I, T)
    InfoLOOB(A, B) = tau * mean_i [ -A_i.B_i / tau + log sum_{j != i} exp(A_i.B_j / tau) ]
    L = InfoLOOB(U_xx, U_xy) + InfoLOOB(U_yy, U_yx)

as the authors' ``cloob``/``infoLOOB_loss``/``hopfield_retrieval`` (their ``-10000`` fill of the
diagonal before the log-sum-exp is an exact leave-one-out here: the positive is left out). 1/tau =
``inv_tau`` is fixed at 30 by default, as in the paper; ``learn_inv_tau=True`` learns it as a log-scale
like CLIP's (clamped to [1, 100]). Inputs are L2-normalised, as in the paper (the module normalises).

With a single item (N = 1 over all ranks) a row has no negatives: the log-sum-exp term is dropped
(the authors' code would add -10000): every retrieval is then the one item's image or caption, so
L = -U_xx.U_xy - U_yy.U_yx = -2.

Distributed: the Hopfield memory is the *whole* batch, and InfoLOOB's columns are retrievals of every
query, so the loss does not decompose by local rows without a second gather. Every rank computes the
whole global loss on the gathered features (`distributed` explains why the gradients still come out
right), O(N^2 D) per rank, which at CLIP batch sizes is small next to the towers. Not tiled (the retrieval
needs a softmax over the whole memory for every query before any InfoLOOB tile can be formed).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def _check_beta(hopfield_beta) -> None:
    finite_number("cloob", "hopfield_beta", hopfield_beta, above=0)


def hopfield_retrieval(queries: Tensor, memory: Tensor, beta: float) -> Tensor:
    """R(Q, M): ``[Nq, D]`` patterns retrieved (one update step) from ``memory`` ``[Nm, D]``, L2-normalised."""
    attention = torch.softmax(beta * queries @ memory.T, dim=-1)
    return normalize(attention @ memory)


def info_loob(a: Tensor, b: Tensor, inv_tau) -> Tensor:
    """tau * mean_i [-a_i.b_i / tau + logsumexp_{j != i} a_i.b_j / tau] for square ``[N, D]`` pairs."""
    k = inv_tau * a @ b.T
    n = k.shape[0]
    positive = k.diagonal()
    if n == 1:
        return -positive.mean() / inv_tau
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    negatives = torch.logsumexp(k.masked_fill(eye, float("-inf")), dim=1)
    return (negatives - positive).mean() / inv_tau


@full_precision
def cloob_terms(image: Tensor, text: Tensor, inv_tau=30.0, hopfield_beta: float = 8.0, *,
                normalize_inputs: bool = False, gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: InfoLOOB(U_xx, U_xy) (image-side anchors) and InfoLOOB(U_yy, U_yx)
    (caption-side anchors), each over the whole (gathered) batch."""
    _check_beta(hopfield_beta)
    check_pair("cloob", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    image, text = rows.image_all, rows.text_all  # whole global loss on every rank
    u_xx = hopfield_retrieval(image, image, hopfield_beta)
    u_xy = hopfield_retrieval(text, image, hopfield_beta)
    u_yy = hopfield_retrieval(text, text, hopfield_beta)
    u_yx = hopfield_retrieval(image, text, hopfield_beta)
    return {"i2t": info_loob(u_xx, u_xy, inv_tau), "t2i": info_loob(u_yy, u_yx, inv_tau)}


def cloob(image: Tensor, text: Tensor, inv_tau=30.0, hopfield_beta: float = 8.0) -> Tensor:
    """CLOOB loss over L2-normalised ``[N, D]`` features; ``inv_tau`` = 1/tau (a number or 0-dim tensor)."""
    terms = cloob_terms(image, text, inv_tau, hopfield_beta)
    return terms["i2t"] + terms["t2i"]


@register_loss("cloob")
class CLOOBLoss(ContrastiveLoss):
    """Logs ``i2t`` = InfoLOOB(U_xx, U_xy) and ``t2i`` = InfoLOOB(U_yy, U_yx). The inverse temperature is
    the base class' scale: fixed at 30 unless ``learn_inv_tau``."""

    def __init__(self, inv_tau: float = 30.0, learn_inv_tau: bool = False, hopfield_beta: float = 8.0):
        _check_beta(hopfield_beta)
        super().__init__(init_scale=inv_tau, learn_scale=learn_inv_tau)
        self.hopfield_beta = float(hopfield_beta)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = cloob_terms(emb.image, emb.text, self.logit_scale, self.hopfield_beta, normalize_inputs=True,
                            gathered=True)
        return LossOutput(terms["i2t"] + terms["t2i"], terms)
