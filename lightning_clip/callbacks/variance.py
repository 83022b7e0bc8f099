"""Per-sample predicted variance, for the families with variance heads (``"image_ln_std"`` or
``"text_ln_std"`` in ``loss.needs``; nothing is logged for the others).

Each validation epoch, over the whole (gathered, deduplicated) validation set:

- TensorBoard histograms ``variance/{text,image}/ln_std``;
- ``variance/{text,image}/mean`` and ``/std`` of the predicted log-std;
- ``variance/text/spearman_specificity``: Spearman correlation between a caption's log-std and its
  specificity level (1 vague .. 4 precise; -1 = unknown, ignored). Seed 000's question: are vaguer
  captions given larger variance? Then this is negative.
- ``variance/image/spearman_num_objects``: the same between an image's log-std and its object count;
- ``variance/text/R@1_decile_<d>``: text-to-image R@1 of the captions in log-std decile d (1 = the
  smallest predicted variance, 10 = the largest), and ``variance/image/R@1_decile_<d>`` with image-to-text
  R@1 by image decile: does higher variance go with worse retrieval?

For a hyperbolic family (``meru``: its loss has ``origin_distance``), the same question asked of its
geometry: ``hyperbolic/text/distance_level_<k>``, the mean distance from the origin of the captions of
specificity level k, and ``hyperbolic/text/spearman_specificity`` (vaguer captions nearer the origin: positive).

The embeddings, ids and ranks come from the `RetrievalCallback` of the same trainer (computed once per
epoch and shared), so the variance statistics describe exactly the items that were ranked.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_clip.callbacks.retrieval import RetrievalCallback
from lightning_clip.eval.calibration import recall_at_1_by_bin, spearman

VARIANCE_FIELDS = frozenset({"image_ln_std", "text_ln_std"})
NUM_BINS = 10


class VarianceCallback(L.Callback):
    def __init__(self, bins: int = NUM_BINS):
        self.bins = bins

    @staticmethod
    def applies_to(pl_module) -> bool:
        loss = getattr(pl_module, "loss", None)
        return bool(VARIANCE_FIELDS & set(getattr(loss, "needs", ())))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        hyperbolic = hasattr(getattr(pl_module, "loss", None), "origin_distance")
        if trainer.sanity_checking or not (self.applies_to(pl_module) or hyperbolic):
            return
        retrieval = next((cb for cb in trainer.callbacks if isinstance(cb, RetrievalCallback)), None)
        if retrieval is None:
            raise RuntimeError("VarianceCallback reads the ranks of a RetrievalCallback; add one to "
                               "trainer.callbacks (lightning_clip.callbacks.default_callbacks() has both)")
        res = retrieval.result(trainer, pl_module)
        if res is None:
            return
        self._log_origin_distance(pl_module, res.text_extra.get("origin_distance"), res.text_extra.get("specificity"))
        sides = (("text", res.text_ln_std, res.t2i_ranks, res.text_extra.get("specificity"), "specificity"),
                 ("image", res.image_ln_std, res.i2t_ranks, res.image_extra.get("num_objects"), "num_objects"))
        for side, ln_std, ranks, attr, attr_name in sides:
            if ln_std is None:
                continue
            self._histogram(trainer, f"variance/{side}/ln_std", ln_std)
            log = {f"variance/{side}/mean": ln_std.mean(), f"variance/{side}/std": ln_std.std(unbiased=False)}
            if attr is not None:
                rho = spearman(ln_std, attr)
                if rho is not None:
                    log[f"variance/{side}/spearman_{attr_name}"] = rho
            for d, r1 in recall_at_1_by_bin(ln_std, ranks, self.bins).items():
                log[f"variance/{side}/R@1_decile_{d}"] = r1
            for key, value in log.items():
                # computed from gathered data: identical on every rank
                pl_module.log(key, value, sync_dist=False, on_step=False, on_epoch=True, batch_size=1)

    @staticmethod
    def _log_origin_distance(pl_module, distance: Optional[Tensor], specificity: Optional[Tensor]) -> None:
        if distance is None or specificity is None:
            return
        log = {f"hyperbolic/text/distance_level_{int(k)}": distance[specificity == k].mean()
               for k in torch.unique(specificity) if k >= 0}
        rho = spearman(distance, specificity)
        if rho is not None:
            log["hyperbolic/text/spearman_specificity"] = rho
        for key, value in log.items():  # from gathered data: identical on every rank
            pl_module.log(key, value, sync_dist=False, on_step=False, on_epoch=True, batch_size=1)

    @staticmethod
    def _histogram(trainer, tag: str, values: Tensor) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(tag, values.detach().float().cpu(), global_step=trainer.global_step)
