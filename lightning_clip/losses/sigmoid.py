"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training";
open_clip `SigLipLoss`).

    z_ij = s * I_i . T_j + b,  y_ij = +1 if i == j else -1,
    L = -(1/N) sum_ij log sigmoid(y_ij z_ij)

Every pair is an independent binary problem, so there is no softmax normaliser: each row needs only
its own logits, and under DDP a rank's image rows against all captions give exactly its share. The bias
starts at -10 because N-1 of every N pairs are negatives: the prior log-odds of a positive are about
-ln N, and starting there keeps the first steps from spending their gradient on pushing all logits down.
The paper's -10 matches N ~ 22,000 (ln 22026 = 10); ``init_bias="prior"`` sets b = -ln N for the global
batch size N this run actually has, at the first training forward (a buffer records that it was done, so
a resumed checkpoint keeps its learned bias). ``bias_batch=M`` carries a bias chosen at batch M (a tuned
one) to this run's batch by the same prior: b = init_bias - ln(N / M), since the prior log-odds move by
-ln N ("prior" is init_bias 0 at M = 1).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import finite_number, integer
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import is_distributed, split_rows, world_size
from lightning_clip.outputs import Embeddings, LossOutput


@full_precision
def siglip_terms(image: Tensor, text: Tensor, logit_scale, logit_bias, *, normalize_inputs: bool = False,
                 gathered: bool = False) -> dict[str, Tensor]:
    """``{"positive", "negative"}``: the diagonal and off-diagonal parts of the loss of the local image
    rows, each summed over pairs and divided by the number of local rows (their sum is the loss)."""
    check_pair("siglip", image, text)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    logits = logit_scale * rows.image @ rows.text_all.T + logit_bias
    diag = logits[torch.arange(len(logits), device=logits.device), rows.labels]
    # -log sigmoid(y z) = softplus(-y z). The negatives' sum is taken over the whole matrix minus the
    # diagonal: no boolean masks or torch.where copies of the N x N matrix.
    b = logits.shape[0]
    return {"positive": F.softplus(-diag).sum() / b,
            "negative": (F.softplus(logits).sum() - F.softplus(diag).sum()) / b}


def siglip(image: Tensor, text: Tensor, logit_scale, logit_bias, chunk_size: Optional[int] = None) -> Tensor:
    """SigLIP loss over L2-normalised ``[N, D]`` features; ``logit_scale`` is exp(log_scale).
    ``chunk_size`` switches to the memory-linear tiled kernel (same values)."""
    if chunk_size is not None:
        check_pair("siglip", image, text)
        from lightning_clip.losses.tiled import tiled_siglip
        return tiled_siglip(image, text, logit_scale, logit_bias, chunk_size=chunk_size)
    terms = siglip_terms(image, text, logit_scale, logit_bias)
    return terms["positive"] + terms["negative"]


@register_loss("siglip")
class SigLIPLoss(ContrastiveLoss):
    """Logs ``positive`` and ``negative`` (the matched-pair and mismatched-pair parts)."""

    def __init__(self, init_scale: float = 10.0, learn_scale: bool = True,
                 init_bias: Union[float, str] = -10.0, learn_bias: bool = True, chunk_size: Optional[int] = None,
                 bias_batch: Optional[int] = None):
        prior = init_bias == "prior"
        if not prior:
            finite_number("siglip", "init_bias", init_bias, alternatives=" or 'prior'")
        if bias_batch is not None:
            if prior:
                raise ValueError("siglip: bias_batch (option model.loss_args.bias_batch) carries a numeric init_bias "
                                 "to this run's batch; init_bias 'prior' already follows the batch, not both")
            integer("siglip", "bias_batch", bias_batch, at_least=1)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale, init_bias=-10.0 if prior else init_bias,
                         learn_bias=learn_bias)
        # (b0, M): the bias starts at b0 - ln(N / M) for the run's global batch N, set at the first training
        # forward (until then -10 or init_bias); "prior" is (0, 1)
        self.batch_rule = (0.0, 1) if prior else None if bias_batch is None else (float(init_bias), bias_batch)
        self.chunk_size = chunk_size
        self._rule_checked = False
        if self.batch_rule is not None:
            # in the state dict: a resumed run does not reset its learned bias
            self.register_buffer("bias_initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_batch_bias(self, local_batch: int) -> None:
        """b = b0 - ln(N / M) for the global batch N (the sum over ranks), once."""
        n = torch.tensor(float(local_batch), device=self.bias.device)
        if world_size() > 1:
            torch.distributed.all_reduce(n)
        b0, reference = self.batch_rule
        self.bias.fill_(b0 - math.log(float(n) / reference))
        self.bias_initialized.fill_(True)

    def forward(self, emb: Embeddings) -> LossOutput:
        if self.batch_rule is not None and self.training and not self._rule_checked:
            # the buffer is read once per process (a device sync), not every step
            if not bool(self.bias_initialized):
                self._init_batch_bias(emb.batch_size)
            self._rule_checked = True
        bias = self.bias.float()
        if self.chunk_size is not None and not is_distributed():
            image, text = normalize(emb.image.float()), normalize(emb.text.float())
            return LossOutput(siglip(image, text, self.logit_scale, bias, chunk_size=self.chunk_size), {})
        terms = siglip_terms(emb.image, emb.text, self.logit_scale, bias, normalize_inputs=True, gathered=True)
        return LossOutput(terms["positive"] + terms["negative"], terms)
