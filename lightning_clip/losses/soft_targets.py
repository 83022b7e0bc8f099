"""The soft-target loss of the OpenAI-CLIP tutorial (seeds 001 and 002: a Keras/PyTorch "simple CLIP"
walk-through and a blog that copies it), as written and corrected.

As written (mode ``"tutorial"``), with raw (unnormalised) projections I, T and a fixed temperature t::

    logits  = T @ I^T / t
    targets = softmax((I @ I^T + T @ T^T) / 2 * t, dim=-1)        # note: * t here, / t above
    L = mean( CE(logits, targets) + CE(logits^T, targets^T) ) / 2  # CE(p, q) = -sum q log_softmax(p)

Why it misbehaves:

1. The temperature divides the prediction logits but multiplies the target logits, so lowering it sharpens
   the predictions while flattening the targets (at the tutorial's t = 1.0 the two agree by accident).
2. Nothing is normalised, so the similarity scale is free: shrinking every embedding toward 0 (or making
   them all equal) makes logits and targets uniform at once.
3. The targets carry gradient. CE(p, q) = H(q) + KL(q || p), so part of every step moves the *targets*
   toward the predictions instead of the predictions toward the pairing. At the collapsed point (all
   embeddings equal) predictions and targets are both uniform, the loss is ln N and its gradient is
   exactly zero (tests/test_losses.py checks this): nothing rewards the true pair, and the optimiser can
   sit there.
4. ``targets.T`` for the image direction is the transpose of a row-softmax: its rows do not sum to 1.

Mode ``"fixed"``: L2-normalised embeddings, one learned scale s used the same way on both sides, targets
detached, and each direction's targets softmaxed over its own axis::

    logits = s * I @ T^T,   M = s * (I @ I^T + T @ T^T) / 2
    L = ( CE(logits, softmax_rows(M)) + CE(logits^T, softmax_rows(M^T)) ) / 2

For distinct items M's diagonal (s) dominates and the targets are close to one-hot (InfoNCE); near
duplicates share probability mass, which is what the tutorial wanted.

Option ``targets`` (mode "fixed" only): ``"self"`` builds M from the embeddings being trained, as above;
``"teacher"`` builds it from a frozen teacher's L2-normalised features I_t, T_t (``Embeddings.teacher_image``
/ ``teacher_text``, from ``model.teacher``), M = s * (I_t @ I_t^T + T_t @ T_t^T) / 2 with the student's s
(one temperature on both sides, as in "fixed"). The tutorial's towers were pretrained, so its targets
knew which items were alike from the first step; a model trained from scratch starts from random
similarities, and "self" then teaches it its own guesses.

Distributed: "fixed" decomposes by rows (local rows of M need only local items against all items);
"tutorial" does not (the image direction reads every row's softmax normaliser), so there every rank
computes the whole global loss on the gathered batch (see `distributed`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import choice
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput

MODES = ("tutorial", "fixed")
TARGETS = ("self", "teacher")


def _check_mode(mode: str) -> None:
    choice("soft_targets", "mode", mode, MODES)


def _check_targets(mode: str, targets: str) -> None:
    choice("soft_targets", "targets", targets, TARGETS)
    if targets == "teacher" and mode != "fixed":
        # the tutorial's targets read the raw projections' free scale; a teacher's normalised features
        # have none, so "tutorial" with a teacher would be neither the tutorial nor the correction
        raise ValueError(f"soft_targets: targets 'teacher' (option model.loss_args.targets) needs mode 'fixed' "
                         f"(option model.loss_args.mode), got mode {mode!r}")


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """The tutorial's `cross_entropy(preds, targets)`: -(targets * log_softmax(preds)).sum(1), per row."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(1)


@full_precision
def soft_targets_terms(image: Tensor, text: Tensor, temperature, *, mode: str = "tutorial",
                       normalize_inputs: bool = False, gathered: bool = False,
                       target_image: Optional[Tensor] = None, target_text: Optional[Tensor] = None
                       ) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}`` (image rows, caption rows). ``temperature`` divides the logits (1 / scale).

    ``target_image``/``target_text`` (``[N, D_t]``, mode "fixed" only): build the targets M from these
    (a teacher's features, normalised like the inputs when ``normalize_inputs``) instead of from
    ``image``/``text``; they never receive gradient."""
    _check_mode(mode)
    check_pair("soft_targets", image, text)
    teacher = target_image is not None or target_text is not None
    if teacher:
        _check_targets(mode, "teacher")
        if target_image is None or target_text is None:
            raise ValueError("soft_targets: target_image and target_text go together (the teacher's two towers)")
        check_pair("soft_targets (teacher targets)", target_image, target_text)
        if target_image.shape[0] != image.shape[0]:
            raise ValueError(f"soft_targets: teacher features have {target_image.shape[0]} rows, the batch "
                             f"{image.shape[0]}; they must describe the same pairs")
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    if mode == "tutorial":
        # whole global loss on every rank (does not decompose by rows)
        rows = split_rows(image, text, gathered)
        image, text = rows.image_all, rows.text_all
        logits = (text @ image.T) / temperature
        targets = torch.softmax((image @ image.T + text @ text.T) / 2 * temperature, dim=-1)
        texts_loss = _soft_ce(logits, targets)
        images_loss = _soft_ce(logits.T, targets.T)
        return {"i2t": images_loss.mean(), "t2i": texts_loss.mean()}
    rows = split_rows(image, text, gathered)
    i2t, t2i = rows.pairwise(lambda a, b: a @ b.T / temperature)
    with torch.no_grad():
        source = rows
        if teacher:
            target_image, target_text = target_image.detach(), target_text.detach()
            if normalize_inputs:
                target_image, target_text = normalize(target_image), normalize(target_text)
            # the teacher's rows gather like the student's, so M keeps its local-rows-by-all-columns form
            source = split_rows(target_image, target_text, gathered)
        # local rows of M = (I I^T + T T^T) / 2; M is symmetric, so the caption rows' targets (softmax over
        # images of column j) are the softmax of row j as well
        m = (source.image @ source.image_all.T + source.text @ source.text_all.T) / 2 / temperature
        q_i2t = torch.softmax(m, dim=-1)
        q_t2i = torch.softmax(m, dim=0).T if rows.local else torch.softmax(m, dim=-1)
    return {"i2t": _soft_ce(i2t, q_i2t).mean(), "t2i": _soft_ce(t2i, q_t2i).mean()}


def soft_targets(image: Tensor, text: Tensor, temperature, *, mode: str = "tutorial",
                 target_image: Optional[Tensor] = None, target_text: Optional[Tensor] = None) -> Tensor:
    """The tutorial's soft-target loss. ``"tutorial"`` takes the raw projections exactly as the tutorial
    does; ``"fixed"`` expects L2-normalised features (and teacher features, when given). Returns the mean
    loss."""
    terms = soft_targets_terms(image, text, temperature, mode=mode, target_image=target_image,
                               target_text=target_text)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("soft_targets")
class SoftTargetsLoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``.

    ``tutorial``: raw projections, fixed temperature 1.0 (the tutorial's `CFG.temperature`), not learned.
    ``fixed``: normalised projections, learned scale initialised at 1/0.07 like CLIP. Pass ``init_scale``
    / ``learn_scale`` to override either (the temperature is 1 / scale). ``targets="teacher"`` (``fixed``
    only) takes the targets from the frozen teacher of ``model.teacher``."""

    def __init__(self, mode: str = "tutorial", init_scale: Optional[float] = None,
                 learn_scale: Optional[bool] = None, targets: str = "self"):
        _check_mode(mode)
        _check_targets(mode, targets)
        fixed = mode == "fixed"
        super().__init__(init_scale=init_scale if init_scale is not None else (1 / 0.07 if fixed else 1.0),
                         learn_scale=learn_scale if learn_scale is not None else fixed)
        self.mode, self.targets = mode, targets
        if targets == "teacher":
            self.needs = frozenset({"teacher"})

    def forward(self, emb: Embeddings) -> LossOutput:
        teacher = self.targets == "teacher"
        if teacher and (emb.teacher_image is None or emb.teacher_text is None):
            raise ValueError("soft_targets: targets 'teacher' needs the teacher's features (Embeddings.teacher_image "
                             "and teacher_text), which ClipModule sets from the checkpoint named by model.teacher")
        terms = soft_targets_terms(emb.image, emb.text, 1.0 / self.logit_scale, mode=self.mode,
                                   normalize_inputs=self.mode == "fixed", gathered=True,
                                   target_image=emb.teacher_image if teacher else None,
                                   target_text=emb.teacher_text if teacher else None)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
