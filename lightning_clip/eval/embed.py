"""A model's embeddings of one evaluation split, deduplicated, with everything the measures need.

A validation-style loader yields one item per (image, caption) pair, so every image appears once per
caption. `embed_split` runs the model once over it (no gradients, eval mode) and keeps each image and each
caption once, in first-seen order, together with the ids that pair them, the predicted log-stds (variance
families), and the synthetic world's ground truth (scenes per image, constraints and specificity per
caption) when the data has it. `embed_images` embeds the images of some shards without captions (the
training features of a linear probe).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.dedup import first_occurrences
from lightning_clip.eval.retrieval import caption_ids, oracle_relevance


@dataclass
class EmbeddedSplit:
    """Per image ``[Ni, ...]`` and per caption ``[Nt, ...]``; ``text_image_ids[j]`` is the image caption j
    was written for. ``image``/``text`` are the head outputs, *not* normalised (a family's own similarity
    may read their norm); `image_unit`/`text_unit` are the L2-normalised views."""

    image: Tensor
    text: Tensor
    image_ids: Tensor
    text_ids: Tensor
    text_image_ids: Tensor
    image_ln_std: Optional[Tensor] = None
    text_ln_std: Optional[Tensor] = None
    scenes: Optional[list[dict]] = None          # per image (synthetic world)
    constraints: Optional[list[dict]] = None     # per caption (synthetic world)
    specificity: Optional[Tensor] = None         # per caption, 1..4 (synthetic world), -1 unknown
    captions: Optional[list[str]] = None         # per caption, its text (the Bayes ceiling's input)
    #: what the family ranks by when it is not the pooled embedding (``loss.retrieval_inputs``: filip's
    #: tokens), one row per image / caption; None means ``image`` / ``text``
    image_rank: Optional[Tensor] = None
    text_rank: Optional[Tensor] = None

    @property
    def image_unit(self) -> Tensor:
        return F.normalize(self.image.float(), dim=-1)

    @property
    def text_unit(self) -> Tensor:
        return F.normalize(self.text.float(), dim=-1)

    def caption_image_index(self) -> Tensor:
        """For each caption, the row of its own image in ``image`` (pairs for alignment)."""
        order = torch.argsort(self.image_ids)
        pos = torch.searchsorted(self.image_ids[order], self.text_image_ids)
        return order[pos.clamp_max(len(order) - 1)]

    def relevance(self) -> Optional[Tensor]:
        """The oracle's bool ``[Nt, Ni]`` (caption j true of image i), or None without ground truth."""
        return oracle_relevance(self.constraints, self.scenes)


@torch.no_grad()
def embed_split(module, loader: Iterable[dict], max_batches: Optional[int] = None) -> EmbeddedSplit:
    """Run ``module`` (a `ClipModule`) over a validation-style loader; see the module docstring."""
    was_training = module.training
    module.eval()
    parts: dict[str, list] = {k: [] for k in ("image", "text", "image_ln_std", "text_ln_std", "image_id",
                                              "text_id", "specificity", "scene", "constraints", "image_rank",
                                              "text_rank", "caption")}
    loss = getattr(module, "loss", None)
    try:
        for batch in islice(loader, max_batches):
            emb = module(_to(batch, module.device))
            meta = batch.get("meta") or {}
            n = emb.batch_size
            if meta.get("image_id") is None:
                raise KeyError("evaluation needs meta['image_id'] to group the captions of one image")
            parts["image"].append(emb.image.float().cpu())
            parts["text"].append(emb.text.float().cpu())
            if hasattr(loss, "retrieval_inputs"):
                image_rank, text_rank = loss.retrieval_inputs(emb)
                if image_rank is not emb.image or text_rank is not emb.text:
                    parts["image_rank"].append(image_rank.float().cpu())
                    parts["text_rank"].append(text_rank.float().cpu())
            for k in ("image_ln_std", "text_ln_std"):
                if getattr(emb, k) is not None:
                    parts[k].append(getattr(emb, k).float().cpu())
            parts["image_id"].append(torch.as_tensor(meta["image_id"]).reshape(n).long().cpu())
            parts["text_id"].append(caption_ids(meta, n))
            if meta.get("specificity") is not None:
                parts["specificity"].append(torch.as_tensor(meta["specificity"]).reshape(n).long().cpu())
            parts["scene"].extend(meta.get("scene") or [None] * n)
            parts["constraints"].extend(meta.get("constraints") or [None] * n)
            parts["caption"].extend(meta.get("caption") or [None] * n)
    finally:
        module.train(was_training)
    if not parts["image"]:
        raise ValueError("the evaluation data yielded no batch (empty or missing shards?)")
    cat = {k: torch.cat(v) for k, v in parts.items() if v and isinstance(v[0], Tensor)}
    # each image and caption once, in order of first appearance
    img_rows, txt_rows = (first_occurrences(cat[k]).sort().values for k in ("image_id", "text_id"))
    scenes = [parts["scene"][i] for i in img_rows.tolist()]
    constraints = [parts["constraints"][i] for i in txt_rows.tolist()]
    captions = [parts["caption"][i] for i in txt_rows.tolist()]
    return EmbeddedSplit(
        image=cat["image"][img_rows], text=cat["text"][txt_rows],
        image_ids=cat["image_id"][img_rows], text_ids=cat["text_id"][txt_rows],
        text_image_ids=cat["image_id"][txt_rows],
        image_ln_std=cat["image_ln_std"][img_rows] if "image_ln_std" in cat else None,
        text_ln_std=cat["text_ln_std"][txt_rows] if "text_ln_std" in cat else None,
        scenes=scenes if all(s is not None for s in scenes) else None,
        constraints=constraints if all(c is not None for c in constraints) else None,
        captions=captions if all(c is not None for c in captions) else None,
        specificity=cat["specificity"][txt_rows] if "specificity" in cat else None,
        image_rank=cat["image_rank"][img_rows] if "image_rank" in cat else None,
        text_rank=cat["text_rank"][txt_rows] if "text_rank" in cat else None)


def _to(batch: Any, device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: (_to(v, device) if k != "meta" else v) for k, v in batch.items()}
    return batch


@torch.no_grad()
def embed_images(module, shards: list[str], transform, limit: int, batch_size: int = 256
                 ) -> tuple[Tensor, list[Optional[dict]]]:
    """Normalised image embeddings ``[n, D]`` and scenes of the first ``limit`` samples of ``shards``
    (read in order; bad samples are skipped silently here, the training run already reported them)."""
    from lightning_clip.data.shards import iter_records

    was_training = module.training
    module.eval()
    feats, scenes, buf = [], [], []

    def flush():
        feats.append(module.encode_image(torch.stack(buf)).cpu())
        buf.clear()

    try:
        records = (r for s in shards for r in iter_records(s, lambda *a: None))
        for r in islice(records, limit):
            buf.append(transform(r.image))
            scenes.append(r.scene)
            if len(buf) == batch_size:
                flush()
        if buf:
            flush()
    finally:
        module.train(was_training)
    if not feats:
        raise ValueError(f"no image could be read from {shards[:3]}...")
    return torch.cat(feats), scenes
