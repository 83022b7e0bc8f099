"""InfoNCE with several positives per row (the supervised-contrastive / "multi-positive" target of
Khosla et al. 2020 and Tian et al. 2023's StableRep, applied to image-caption pairs).

A batch can hold the same image twice, several captions of one image, or identical captions. InfoNCE then
calls a true match a negative. Here image i and caption j are positives iff image_groups[i] ==
text_groups[j] (and the paired item j == i always is), and the target of each row spreads evenly over its
positives, per direction:

    q^{I->T}_ij = P_ij / sum_j P_ij,   q^{T->I}_ji = P_ij / sum_i P_ij,   P_ij = [g^I_i == g^T_j]
    L = (CE(s I T^T, q^{I->T}) + CE(s T I^T, q^{T->I})) / 2

With all groups distinct the targets are one-hot and this equals `infonce` exactly (a test checks it).

``positives="oracle"`` takes P from the synthetic world's oracle instead (``relevance``, the batch's
``meta["relevance"]``: P_ij = caption j is true of image i, diagonal included), which also counts
"a red thing" as a positive of every image with a red object. The oracle knows only the local batch, so
this mode refuses to run under DDP (world size > 1), where the columns would span other ranks' items.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import choice
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather, is_distributed, split_rows
from lightning_clip.outputs import Embeddings, LossOutput


def _soft_ce(logits: Tensor, positive: Tensor) -> Tensor:
    targets = positive.to(logits.dtype)
    targets = targets / targets.sum(1, keepdim=True)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


POSITIVES = ("groups", "oracle")


def _check_relevance(relevance: Tensor, n: int, gathered: bool) -> None:
    if gathered and is_distributed():
        raise ValueError("multi_positive: positives='oracle' (option model.loss_args.positives) needs the "
                         "relevance of the global batch, but each DDP worker knows only its local batch's; "
                         "use positives='groups' with more than one process")
    if not isinstance(relevance, Tensor) or relevance.dtype != torch.bool or tuple(relevance.shape) != (n, n):
        got = (f"{relevance.dtype} {tuple(relevance.shape)}" if isinstance(relevance, Tensor)
               else type(relevance).__name__)
        raise ValueError(f"multi_positive: relevance (positives='oracle') must be a bool [N, N] = [{n}, {n}] "
                         f"tensor (images x captions of one batch; not with model.negatives_from > 1), got {got}")


def _positives(image_groups: Tensor, text_groups: Tensor, image_all_groups: Tensor, text_all_groups: Tensor,
               local: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    pos_i2t = image_groups[:, None] == text_all_groups[None, :]
    pos_t2i = text_groups[:, None] == image_all_groups[None, :]
    # the paired item is a positive even if its ids disagree, so no row is ever left without a target
    pos_i2t[local, labels] = True
    pos_t2i[local, labels] = True
    return pos_i2t, pos_t2i


@full_precision
def multi_positive_terms(image: Tensor, text: Tensor, logit_scale, image_groups: Optional[Tensor],
                         text_groups: Optional[Tensor], *, relevance: Optional[Tensor] = None,
                         normalize_inputs: bool = False, gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i", "positives"}``: the two halves and the mean number of positives per image row
    (1.0 when every group is distinct; logged, not differentiated).

    ``relevance`` (bool ``[N images, N captions]``) replaces the groups as the positive mask (the oracle
    mode); give one or the other."""
    check_pair("multi_positive", image, text)
    n = image.shape[0]
    if relevance is not None:
        if image_groups is not None or text_groups is not None:
            raise ValueError("multi_positive: give either group ids or a relevance matrix, not both")
        _check_relevance(relevance, n, gathered)
        if normalize_inputs:
            image, text = normalize(image), normalize(text)
        logits = logit_scale * image @ text.T
        pos_i2t = relevance.clone()
        pos_i2t.fill_diagonal_(True)  # the paired item is always a positive
        pos_t2i = pos_i2t.T
        return {"i2t": _soft_ce(logits, pos_i2t), "t2i": _soft_ce(logits.T, pos_t2i),
                "positives": pos_i2t.sum(1).to(logits.dtype).mean().detach()}
    if (image_groups is None) != (text_groups is None):
        raise ValueError("multi_positive: give both image_groups and text_groups, or neither")
    if image_groups is None:  # all distinct
        image_groups = text_groups = torch.arange(n, device=image.device)
        gathered_groups = False
    else:
        gathered_groups = True
        for name, g in (("image_groups", image_groups), ("text_groups", text_groups)):
            if tuple(g.shape) != (n,) or g.is_floating_point():
                raise ValueError(f"multi_positive: {name} must be an integer tensor of shape [N] = [{n}], "
                                 f"got {g.dtype} {tuple(g.shape)}")
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    labels = rows.labels
    local = torch.arange(n, device=image.device)
    if gathered and gathered_groups:
        image_all_groups, text_all_groups = gather(image_groups)[0], gather(text_groups)[0]
    elif rows.local:
        image_all_groups, text_all_groups = image_groups, text_groups
    else:  # distinct groups on every rank: the global index is the group
        image_all_groups = text_all_groups = torch.arange(len(rows.image_all), device=image.device)
        image_groups = text_groups = labels
    pos_i2t, pos_t2i = _positives(image_groups, text_groups, image_all_groups, text_all_groups, local, labels)
    return {"i2t": _soft_ce(i2t, pos_i2t), "t2i": _soft_ce(t2i, pos_t2i),
            "positives": pos_i2t.sum(1).to(i2t.dtype).mean().detach()}


def multi_positive(image: Tensor, text: Tensor, logit_scale, image_groups: Optional[Tensor] = None,
                   text_groups: Optional[Tensor] = None, *, relevance: Optional[Tensor] = None) -> Tensor:
    """Multi-positive InfoNCE over L2-normalised ``[N, D]`` features, with positives from integer group
    ids ``[N]`` or from a bool relevance matrix ``[N images, N captions]``."""
    terms = multi_positive_terms(image, text, logit_scale, image_groups, text_groups, relevance=relevance)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("multi_positive")
class MultiPositiveLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` and ``positives`` (mean positives per image row). ``positives``: ``"groups"``
    (equal group ids; without ids in the batch it is plain InfoNCE) or ``"oracle"`` (the batch's
    ``meta["relevance"]``, synthetic data only, one process only)."""

    needs = frozenset({"groups"})

    def __init__(self, init_scale: float = 1 / 0.07, learn_scale: bool = True, positives: str = "groups"):
        choice("multi_positive", "positives", positives, POSITIVES)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale)
        self.positives = positives
        self.needs = frozenset({"relevance"}) if positives == "oracle" else frozenset({"groups"})

    def forward(self, emb: Embeddings) -> LossOutput:
        if self.positives == "oracle":
            if emb.relevance is None:
                raise ValueError("multi_positive: positives='oracle' (option model.loss_args.positives) needs the "
                                 "batch's relevance matrix (meta['relevance'], synthetic data only); this batch "
                                 "has none")
            terms = multi_positive_terms(emb.image, emb.text, self.logit_scale, None, None,
                                         relevance=emb.relevance, normalize_inputs=True, gathered=True)
        else:
            terms = multi_positive_terms(emb.image, emb.text, self.logit_scale, emb.image_groups,
                                         emb.text_groups, normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
