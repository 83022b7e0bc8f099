"""Image-text retrieval at the end of each validation epoch: recall@1/5/10, median and mean rank, and
semantic recall@k on the synthetic world.

Reads what `ClipModule.validation_step` returns: ``{"emb": Embeddings, "meta": batch["meta"]}``. Every
rank's embeddings are gathered by `RetrievalMetric` (torchmetrics list states), so the values are global
and logged with ``sync_dist=False``. Ranking uses ``pl_module.loss.similarity``: cosine for most families,
the family's own likelihood score for those that override it (probabilistic, pcmepp), or token-wise scores
on the per-item tensors the family asks to keep (``loss.retrieval_inputs``: filip's tokens), so each family
is ranked by the match it was trained for.

Semantic relevance needs each image's scene and each caption's constraints (synthetic data only): they are
collected per id here, gathered across ranks as python objects, and turned into a relevance matrix by
`lightning_clip.eval.retrieval.oracle_relevance`. Real data has ``None`` there and gets no semantic keys.

With the relevance the callback also logs the oracle ceiling, ``val/ceiling/{t2i,i2t}/R@1``
(`lightning_clip.eval.retrieval.oracle_ceiling`): the expected R@1 of the relevance oracle used as a scorer (a
caption counts more the fewer images it fits; ties broken at random), i.e. what the vague captions leave
reachable. It is constant for a validation set and costs two reductions
over the relevance matrix (2,500 x 500 on the default world), so it is simply recomputed each epoch.

Beside it, the Bayes ceiling ``val/bayes/{t2i,i2t}/R@1`` (`lightning_clip.eval.ceilings`): the expected R@1
of the caption generator's own likelihood P(caption | image) as the scorer, needing each caption's text as
the generator rendered it. It depends on the data only and costs a parse per distinct caption, so it is
computed once per validation set (keyed by its ids) and kept on the callback.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_clip.eval.retrieval import (DEFAULT_CHUNK, DEFAULT_KS, RetrievalMetric, RetrievalResult, caption_ids,
                                          oracle_ceiling, oracle_relevance)
from lightning_clip.eval.ceilings import bayes_ceiling_of

IMAGE_EXTRAS = ("num_objects",)
TEXT_EXTRAS = ("specificity",)


def _as_long(value: Any, n: int, device) -> Tensor:
    return torch.as_tensor(value, dtype=torch.long, device=device).reshape(n)


def _gather_objects(local: dict) -> dict:
    """Merge a dict from every rank (python objects; torchmetrics only gathers tensors)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


class RetrievalCallback(L.Callback):
    """Logs ``val/{i2t,t2i}/R@k``, ``val/{i2t,t2i}/{median,mean}_rank`` and, on synthetic data,
    ``val/semantic/{i2t,t2i}/R@k``, the oracle ceiling ``val/ceiling/{t2i,i2t}/R@1`` and the Bayes ceiling
    ``val/bayes/{t2i,i2t}/R@1``. ``last_metrics``
    keeps the last logged values (floats)."""

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, chunk_size: int = DEFAULT_CHUNK, prefix: str = "val"):
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.prefix = prefix
        self.metric: Optional[RetrievalMetric] = None
        self.last_metrics: dict[str, float] = {}
        self._scenes: dict[int, Any] = {}
        self._constraints: dict[int, Any] = {}
        self._texts: dict[int, Any] = {}
        self._bayes: Optional[tuple[bytes, Optional[dict[str, Tensor]]]] = None  # (the validation set's ids, its value)
        self._result: Optional[RetrievalResult] = None
        self._computed = False

    # -- accumulation --------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        loss = getattr(pl_module, "loss", None)
        # a hyperbolic family (meru) also reports each caption's distance from the origin
        text_extras = TEXT_EXTRAS + (("origin_distance",) if hasattr(loss, "origin_distance") else ())
        self.metric = RetrievalMetric(similarity=getattr(loss, "similarity", None), ks=self.ks,
                                      chunk_size=self.chunk_size, relevance_fn=self._relevance,
                                      image_extras=IMAGE_EXTRAS, text_extras=text_extras).to(pl_module.device)
        self._scenes, self._constraints, self._texts = {}, {}, {}
        self._result, self._computed = None, False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "emb" not in outputs:
            raise TypeError("RetrievalCallback needs validation_step to return {'emb': Embeddings, 'meta': "
                            f"batch['meta']}}; got {type(outputs).__name__}")
        emb, meta = outputs["emb"], outputs.get("meta") or {}
        if meta.get("image_id") is None:
            raise KeyError("RetrievalCallback needs meta['image_id'] (one id per source image) to group the "
                           "captions of one image")
        n, device = emb.batch_size, self.metric.device
        image_id = _as_long(meta["image_id"], n, device)
        text_id = caption_ids(meta, n).to(device)
        extras = {f"image_{e}": _as_long(meta[e], n, device) for e in IMAGE_EXTRAS if meta.get(e) is not None}
        extras.update({f"text_{e}": _as_long(meta[e], n, device) for e in TEXT_EXTRAS if meta.get(e) is not None})
        # what the loss family ranks by: the pooled embeddings, or its own per-item inputs (filip's tokens)
        loss = getattr(pl_module, "loss", None)
        image, text = loss.retrieval_inputs(emb) if hasattr(loss, "retrieval_inputs") else (emb.image, emb.text)
        if "origin_distance" in self.metric.text_extras:
            extras["text_origin_distance"] = loss.origin_distance(emb.text).to(device)
        self.metric.update(image, text, image_id, text_id, image_ln_std=emb.image_ln_std,
                           text_ln_std=emb.text_ln_std, **extras)
        scenes, constraints, texts = meta.get("scene"), meta.get("constraints"), meta.get("caption")
        for i in range(n):
            if scenes is not None and scenes[i] is not None:
                self._scenes[int(image_id[i])] = scenes[i]
            if constraints is not None and constraints[i] is not None:
                self._constraints[int(text_id[i])] = constraints[i]
                if texts is not None:  # the Bayes ceiling's input; only with ground truth
                    self._texts[int(text_id[i])] = texts[i]

    def _relevance(self, image_ids: Tensor, text_ids: Tensor) -> Optional[Tensor]:
        """bool [n_texts, n_images] from the oracle, or None unless every item has ground truth."""
        return oracle_relevance([self._constraints.get(int(t)) for t in text_ids],
                                [self._scenes.get(int(i)) for i in image_ids])

    def _bayes_ceiling(self, res: RetrievalResult) -> Optional[dict[str, Tensor]]:
        """The Bayes ceiling of this validation set, computed on its first epoch and then reused: the
        likelihood matrix depends on the data only."""
        key = b"".join(x.cpu().numpy().tobytes() for x in (res.image_ids, res.text_ids, res.text_image_ids))
        if self._bayes is None or self._bayes[0] != key:
            self._bayes = (key, bayes_ceiling_of([self._texts.get(int(t)) for t in res.text_ids],
                                                 [self._scenes.get(int(i)) for i in res.image_ids],
                                                 res.image_ids, res.text_image_ids))
        return self._bayes[1]

    # -- results ---------------------------------------------------------------------------------------
    def result(self, trainer, pl_module) -> Optional[RetrievalResult]:
        """This epoch's `RetrievalResult`, computed once (other callbacks, e.g. variance, share it). A
        collective under DDP: every rank must call it. None when validation saw no batch."""
        if not self._computed:
            self._computed = True
            # Under DDP every rank must have seen at least one batch (Lightning's samplers and the data
            # module's node split guarantee it); a rank returning here would leave the others waiting.
            if self.metric is None or self.metric.update_count == 0:
                return None
            # the oracle's inputs live in python dicts: gather them before the metric gathers tensors
            self._scenes = _gather_objects(self._scenes)
            self._constraints = _gather_objects(self._constraints)
            self._texts = _gather_objects(self._texts)
            self.metric.compute()
            self._result = self.metric.last_result
            self.metric.reset()  # free the gathered embeddings; the ranks stay in the result
        return self._result

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:  # a couple of batches, not a measurement
            return
        res = self.result(trainer, pl_module)
        if res is None:
            return
        self.last_metrics = {}
        logged = dict(res.metrics)
        if res.relevance is not None and res.text_image_ids is not None:
            logged.update({f"ceiling/{k}": v for k, v in
                           oracle_ceiling(res.relevance, res.image_ids, res.text_image_ids).items()})
            logged.update({f"bayes/{k}": v for k, v in (self._bayes_ceiling(res) or {}).items()})
        for name, value in logged.items():
            key = f"{self.prefix}/{name}"
            # already global (the metric gathered every rank), so no second reduction
            pl_module.log(key, value, sync_dist=False, on_step=False, on_epoch=True, batch_size=1)
            self.last_metrics[key] = float(value)
