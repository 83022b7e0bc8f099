"""Global contrastive loss with per-item moving-average states (SogCLR, Yuan et al. 2022; iSogCLR, Qiu et
al. 2023; FastCLIP, Wei et al. 2024; this is the FastCLIP code's form).

InfoNCE's denominator is an in-batch estimate of a sum over the whole data set; at batch 16-128 it is a
poor one. Here each training image i and caption i keep a state u_i, a moving average over the steps in
which they were seen of

    g^I_i = (1/(N-1)) sum_{j != i} exp(s (S_ij - S_ii)),   g^T_i = (1/(N-1)) sum_{j != i} exp(s (S_ji - S_ii)),

    u'_i = (1 - gamma) u_i + gamma g_i   (u'_i = g_i for an item not seen yet, u_i = 0), without gradient,
    A = mean_i [g^I_i / (u'^I_i + eps) + g^T_i / (u'^T_i + eps)],

so the gradient of A is that of the data-set-level log-denominator, estimated with the smoothed u'.
``temperature_term`` (FastCLIP's global temperature): L = A / sg(s) + rho / s + mean_i [ln u'^I_i +
ln u'^T_i] / (2 s); without it (SogCLR) L = A and the scale stays fixed by default.

Every g is computed in log space and the state arithmetic in float64: at scale 100 a negative ahead of
the positive by 0.9 in cosine gives exp(90) (float32 overflows at exp(88.7)) and one behind by 2 gives
exp(-200) (float32 underflows at exp(-103)), and a state stored as 0 would read as "not seen yet".
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import choice, finite_number, integer
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import gather, is_distributed, split_rows
from lightning_clip.outputs import Embeddings, LossOutput

GAMMA_SCHEDULES = ("constant", "cosine")


def _check_options(gamma, rho, eps) -> None:
    finite_number("gcl", "gamma", gamma, above=0)
    if gamma > 1:
        raise ValueError(f"gcl: gamma (option model.loss_args.gamma) must be a finite number > 0 and <= 1, "
                         f"got {gamma!r}")
    finite_number("gcl", "rho", rho)
    finite_number("gcl", "eps", eps, above=0)


def _log_g(logits: Tensor, labels: Tensor, n_columns: int) -> Tensor:
    """ln g per row: ln of the mean over the other columns of exp(z_ij - z_i,label)."""
    rows = torch.arange(len(logits), device=logits.device)
    diff = logits - logits[rows, labels][:, None]
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[rows, labels] = True
    return torch.logsumexp(diff.masked_fill(mask, float("-inf")), dim=1) - math.log(n_columns - 1)


def _moving_average(log_g: Tensor, u: Tensor, gamma: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(ln u', u', ln(u' + eps))`` in float64, without gradient; u = 0 marks an item not seen yet."""
    log_g = log_g.detach().double()
    u = u.detach().to(log_g.device, torch.float64)
    seen = u > 0
    log_u = torch.where(seen, u, torch.ones_like(u)).log()
    blended = log_g + math.log(gamma)
    if gamma < 1:
        blended = torch.logaddexp(log_u + math.log1p(-gamma), blended)
    log_new = torch.where(seen, blended, log_g)
    return log_new, log_new.exp(), torch.logaddexp(log_new, torch.full_like(log_new, math.log(eps)))


@full_precision
def gcl_terms(image: Tensor, text: Tensor, logit_scale, u_image: Tensor, u_text: Tensor, *, gamma: float = 0.9,
              rho: float = 8.0, temperature_term: bool = True, eps: float = 1e-14, normalize_inputs: bool = False,
              gathered: bool = False) -> dict[str, Tensor]:
    """The local rows' share of the loss and their new states. Keys: ``loss``, ``i2t``, ``t2i`` (mean
    g/(u'+eps) per direction; A is their sum), ``log_u`` (mean ln u' over both sides), ``u_image``, ``u_text``
    (new states [B], float64, no gradient). ``gathered``: local rows against every rank's columns."""
    check_pair("gcl", image, text, u_image=u_image, u_text=u_text)
    _check_options(gamma, rho, eps)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    n = rows.image_all.shape[0]
    if n < 2:
        raise ValueError("gcl: needs at least 2 pairs over all ranks (with N = 1 no item has a negative, "
                         "so g, a mean over the other items, is undefined)")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), dtype=image.dtype, device=image.device)
    i2t, t2i = rows.pairwise(lambda a, b: logit_scale * a @ b.T)
    out: dict[str, Tensor] = {}
    log_us = []
    for side, logits, u in (("i2t", i2t, u_image), ("t2i", t2i, u_text)):
        log_g = _log_g(logits, rows.labels, n)
        log_new, new, log_denominator = _moving_average(log_g, u, gamma, eps)
        out[side] = (log_g.double() - log_denominator).exp().mean()
        out["u_image" if side == "i2t" else "u_text"] = new
        log_us.append(log_new)
    a = out["i2t"] + out["t2i"]
    out["log_u"] = (log_us[0].mean() + log_us[1].mean()) / 2
    if temperature_term:
        s = logit_scale.double()
        loss = a / s.detach() + rho / s + out["log_u"] / s
    else:
        loss = a
    out["loss"] = loss.to(image.dtype)
    for key in ("i2t", "t2i", "log_u"):
        out[key] = out[key].detach().to(image.dtype)
    return out


def gcl(image: Tensor, text: Tensor, logit_scale, u_image: Tensor, u_text: Tensor, gamma: float = 0.9,
        rho: float = 8.0, temperature_term: bool = True, eps: float = 1e-14) -> tuple[Tensor, Tensor, Tensor]:
    """The global contrastive loss over L2-normalised ``[N, D]`` features and the rows' current states
    ``u_image``, ``u_text`` ``[N]`` (0: not seen yet); returns ``(loss, u_image_new, u_text_new)``, the new
    states in float64 without gradient. ``logit_scale`` is the multiplier s = exp(log_scale)."""
    terms = gcl_terms(image, text, logit_scale, u_image, u_text, gamma=gamma, rho=rho,
                      temperature_term=temperature_term, eps=eps)
    return terms["loss"], terms["u_image"], terms["u_text"]


class ItemStates:
    """A table id -> state that grows with the data it meets: ids sorted in a long tensor, states in a
    float64 tensor beside them (on the features' device). Lookups and merges are a searchsorted and a
    sort, with no host round trip; the size of a shard stream need not be known in advance."""

    def __init__(self) -> None:
        self.ids = torch.zeros(0, dtype=torch.long)
        self.values = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def to(self, device) -> "ItemStates":
        if self.ids.device != torch.device(device):
            self.ids, self.values = self.ids.to(device), self.values.to(device)
        return self

    def lookup(self, ids: Tensor) -> Tensor:
        """The states of ``ids`` (0 for an id never stored)."""
        self.to(ids.device)
        if not len(self):
            return torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
        pos = torch.searchsorted(self.ids, ids).clamp_(max=len(self) - 1)
        return torch.where(self.ids[pos] == ids, self.values[pos], torch.zeros((), dtype=torch.float64,
                                                                                 device=ids.device))

    def update(self, ids: Tensor, values: Tensor) -> None:
        """Store ``values`` under ``ids``; where an id repeats, its last row wins (the same rule on every
        rank, which all receive the same rows in the same order)."""
        self.to(ids.device)
        all_ids = torch.cat([self.ids, ids])
        all_values = torch.cat([self.values, values.to(ids.device, torch.float64)])
        order = torch.sort(all_ids, stable=True).indices
        sorted_ids = all_ids[order]
        last = torch.ones_like(sorted_ids, dtype=torch.bool)
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        self.ids, self.values = sorted_ids[last], all_values[order][last]

    def state(self) -> dict[str, Tensor]:
        return {"ids": self.ids.detach().cpu().clone(), "values": self.values.detach().cpu().clone()}

    def load(self, state: dict[str, Tensor]) -> None:
        ids = torch.as_tensor(state["ids"], dtype=torch.long)
        values = torch.as_tensor(state["values"], dtype=torch.float64)
        if ids.shape != values.shape or ids.dim() != 1 or (len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError("gcl: the checkpoint's item states are malformed (ids must be sorted and unique, "
                             "one state per id)")
        self.ids, self.values = ids, values


@register_loss("gcl")
class GCLoss(ContrastiveLoss):
    """Logs ``i2t``, ``t2i`` (mean g/(u'+eps) per direction), ``log_u`` (mean ln u'), ``gamma`` and
    ``seen`` (the share of this batch's items that had a state). Owns one state per training image and
    per training caption, keyed by their ids (``needs={"ids"}``), kept in the checkpoint (the module's
    extra state) and, under DDP, identical on every rank after each step (the rows' ids and new states
    are gathered). Only training forwards update them; validation reads them.

    ``gamma_schedule``: ``constant`` or FastCLIP's ``cosine``, gamma_t = gamma + (1 - gamma)(1 + cos(pi
    min(t, T) / T)) / 2 from 1 down to ``gamma`` over T = ``gamma_decay_steps`` optimizer steps.
    ``learn_scale`` defaults to ``temperature_term``: SogCLR keeps its temperature fixed."""

    needs = frozenset({"ids"})

    def __init__(self, gamma: float = 0.9, gamma_schedule: str = "constant", gamma_decay_steps: int = 1000,
                 rho: float = 8.0, temperature_term: bool = True, init_scale: float = 1 / 0.07,
                 learn_scale: Optional[bool] = None, eps: float = 1e-14):
        _check_options(gamma, rho, eps)
        choice("gcl", "gamma_schedule", gamma_schedule, GAMMA_SCHEDULES)
        if not isinstance(temperature_term, bool):
            raise ValueError(f"gcl: temperature_term (option model.loss_args.temperature_term) must be true or "
                             f"false, got {temperature_term!r}")
        super().__init__(init_scale=init_scale,
                         learn_scale=temperature_term if learn_scale is None else learn_scale)
        self.gamma, self.gamma_schedule, self.rho, self.eps = gamma, gamma_schedule, rho, eps
        self.gamma_decay_steps = integer("gcl", "gamma_decay_steps", gamma_decay_steps, at_least=1)
        self.temperature_term = temperature_term
        # optimizer steps taken (the cosine schedule's clock); a buffer, so a resume continues the schedule
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.image_states, self.text_states = ItemStates(), ItemStates()

    def current_gamma(self) -> float:
        if self.gamma_schedule == "constant":
            return self.gamma
        t = min(int(self.steps), self.gamma_decay_steps) / self.gamma_decay_steps
        return self.gamma + (1 - self.gamma) * 0.5 * (1 + math.cos(math.pi * t))

    @torch.no_grad()
    def clamp_(self) -> None:
        super().clamp_()
        self.steps += 1

    def forward(self, emb: Embeddings) -> LossOutput:
        if emb.image_ids is None or emb.text_ids is None:
            raise ValueError("gcl: needs image_ids and text_ids (Embeddings fields set by ClipModule from "
                             "meta['image_id'] and meta['key']): its per-item states are keyed by them")
        check_pair("gcl", emb.image, emb.text, image_ids=emb.image_ids, text_ids=emb.text_ids)
        gamma = self.current_gamma()
        image_ids, text_ids = emb.image_ids.long(), emb.text_ids.long()
        u_image, u_text = self.image_states.lookup(image_ids), self.text_states.lookup(text_ids)
        terms = gcl_terms(emb.image, emb.text, self.logit_scale, u_image, u_text, gamma=gamma, rho=self.rho,
                          temperature_term=self.temperature_term, eps=self.eps, normalize_inputs=True,
                          gathered=True)
        if self.training:
            self._store(image_ids, text_ids, terms["u_image"], terms["u_text"])
        dtype = terms["loss"].dtype
        logged = {k: terms[k] for k in ("i2t", "t2i", "log_u")}
        logged["gamma"] = torch.tensor(gamma, dtype=dtype, device=terms["loss"].device)
        logged["seen"] = ((u_image > 0).double().mean() + (u_text > 0).double().mean()).to(dtype) / 2
        return LossOutput(terms["loss"], logged)

    @torch.no_grad()
    def _store(self, image_ids: Tensor, text_ids: Tensor, u_image: Tensor, u_text: Tensor) -> None:
        if is_distributed():  # every rank stores every rank's rows, in rank order: the tables stay equal
            image_ids, text_ids = gather(image_ids)[0], gather(text_ids)[0]
            u_image, u_text = gather(u_image)[0], gather(u_text)[0]
        self.image_states.update(image_ids, u_image)
        self.text_states.update(text_ids, u_text)

    # -- the checkpoint: tables whose size grows with the data, so not buffers of a fixed shape -------------
    def get_extra_state(self) -> Any:
        return {"image": self.image_states.state(), "text": self.text_states.state()}

    def set_extra_state(self, state: Any) -> None:
        self.image_states.load(state["image"])
        self.text_states.load(state["text"])
