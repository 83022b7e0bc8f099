"""Every measure of a trained model on one split, as CLIP_benchmark-style records.

`evaluate_split` returns a list of records, one per (dataset, task), in CLIP_benchmark's result layout::

    {"dataset": "synthetic48/val", "model": "losses/infonce/seed_0", "pretrained": "<checkpoint>",
     "task": "zeroshot_retrieval", "metrics": {"image_retrieval_recall@1": ..., ...}, "language": "en"}

Tasks: ``zeroshot_retrieval`` (recall@k both ways with CLIP_benchmark's key names, plus ours: semantic
recall, the oracle and Bayes ceilings, t2i R@1 per caption specificity), ``zeroshot_classification`` and
``linear_probe`` (one record per attribute of the synthetic world, dataset ``<split>/<attribute>``),
``embedding_geometry`` and, for families with variance heads, ``variance_calibration``.
`flatten` turns records into ``eval/<task>/[<attribute>/]<metric>`` scalars (TensorBoard, the report).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_clip.eval import calibration, geometry, probe, world_tasks, zeroshot
from lightning_clip.eval.embed import EmbeddedSplit
from lightning_clip.eval.records import TABLE_KEYS, flatten, record  # noqa: F401 (re-exported)
from lightning_clip.eval.ceilings import bayes_ceiling_of
from lightning_clip.eval.retrieval import oracle_ceiling, recall_at_1_by_level, retrieval_metrics

TextEmbedFn = Callable[[list[str]], Tensor]

def retrieval_record_metrics(split: EmbeddedSplit, similarity=None) -> tuple[dict[str, float], Tensor, Tensor]:
    """Retrieval metrics (CLIP_benchmark's names and ours) and the i2t / t2i ranks."""
    relevance = split.relevance()
    image = split.image if split.image_rank is None else split.image_rank
    text = split.text if split.text_rank is None else split.text_rank
    metrics, i2t_ranks, t2i_ranks = retrieval_metrics(
        image, text, split.image_ids, split.text_image_ids, similarity=similarity,
        image_ln_std=split.image_ln_std, text_ln_std=split.text_ln_std, relevance=relevance)
    out = {}
    for k in (1, 5, 10):  # CLIP_benchmark's names: image retrieval = text queries, text retrieval = image queries
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i/R@{k}"]
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t/R@{k}"]
    out.update({k.replace("/", "_"): v for k, v in metrics.items() if k.startswith("semantic/")})
    out.update({f"{d}_median_rank": metrics[f"{d}/median_rank"] for d in ("i2t", "t2i")})
    if relevance is not None:
        out.update({f"ceiling_{k.replace('/', '_')}": v for k, v in
                    oracle_ceiling(relevance, split.image_ids, split.text_image_ids).items()})
        bayes = bayes_ceiling_of(split.captions, split.scenes, split.image_ids, split.text_image_ids)
        out.update({f"bayes_{k.replace('/', '_')}": v for k, v in (bayes or {}).items()})
    if split.specificity is not None:
        out.update({f"t2i_R@1_specificity_{lv}": v for lv, v in
                    recall_at_1_by_level(t2i_ranks, split.specificity).items()})
    return out, i2t_ranks, t2i_ranks

def geometry_metrics(split: EmbeddedSplit) -> dict[str, float]:
    """Alignment over (caption, own image) pairs; uniformity, effective rank and collapse per modality
    over distinct items; the modality gap between the distinct images' and captions' centroids."""
    img, txt = split.image_unit, split.text_unit
    paired = img[split.caption_image_index()]
    return {"alignment": geometry.alignment(paired, txt),
            "uniformity_image": geometry.uniformity(img), "uniformity_text": geometry.uniformity(txt),
            "modality_gap": geometry.modality_gap(img, txt),
            "effective_rank_image": geometry.effective_rank(img), "effective_rank_text": geometry.effective_rank(txt),
            # under 1% of an even spread's share (1/D each): the literal "1% of the variance" would count
            # every direction of a healthy 128-d embedding (0.78% each) as collapsed
            "low_variance_share_image": geometry.low_variance_share(img, 0.01 / img.shape[1]),
            "low_variance_share_text": geometry.low_variance_share(txt, 0.01 / txt.shape[1])}

def calibration_metrics(ln_std: Tensor, ranks: Tensor) -> dict[str, float]:
    """Does a larger predicted variance go with worse retrieval? R@1 per log-std decile (1 = most certain),
    and the area between the sparsification curve and the oracle's (AUSE; 0 = uncertainty orders the
    errors perfectly)."""
    out = {f"R@1_decile_{d}": v for d, v in calibration.recall_at_1_by_bin(ln_std, ranks).items()}
    out["ause"] = calibration.ause(ln_std, calibration.retrieval_error(ranks))
    return out

def evaluate_split(split: EmbeddedSplit, *, dataset: str, model: str = "", pretrained: str = "",
                   similarity=None, text_embed_fn: Optional[TextEmbedFn] = None,
                   probe_train: Optional[tuple[Tensor, list]] = None) -> list[dict]:
    """Every measure on ``split`` (see the module docstring). ``text_embed_fn(prompts) -> [n, D]`` enables
    zero-shot classification; ``probe_train = (image features, scenes)`` of training images enables the
    linear probes. Attribute tasks need the synthetic world's scenes; real data gets retrieval, geometry
    and calibration only."""
    rec = lambda ds, task, m: record(ds, task, m, model, pretrained)  # noqa: E731
    retrieval, i2t_ranks, t2i_ranks = retrieval_record_metrics(split, similarity)
    records = [rec(dataset, "zeroshot_retrieval", retrieval), rec(dataset, "embedding_geometry", geometry_metrics(split))]
    if split.text_ln_std is not None or split.image_ln_std is not None:
        cal = {}
        if split.text_ln_std is not None:
            cal.update({f"text_{k}": v for k, v in calibration_metrics(split.text_ln_std, t2i_ranks).items()})
        if split.image_ln_std is not None:
            cal.update({f"image_{k}": v for k, v in calibration_metrics(split.image_ln_std, i2t_ranks).items()})
        records.append(rec(dataset, "variance_calibration", cal))
    if split.scenes is None:
        return records
    image = split.image_unit
    for task, spec in world_tasks.TASKS.items():
        keep, y = world_tasks.labelled(task, split.scenes)
        if len(keep) < 2:
            continue
        if text_embed_fn is not None:
            zs = zeroshot.evaluate_zero_shot(image[keep], y, text_embed_fn, spec.classnames, spec.templates)
            records.append(rec(f"{dataset}/{task}", "zeroshot_classification", {**zs, "n": len(keep)}))
        if probe_train is not None:
            feats, scenes = probe_train
            train_keep, train_y = world_tasks.labelled(task, scenes)
            if len(train_y.unique()) >= 2:  # a probe needs two classes to separate
                lp = probe.linear_probe(feats[train_keep], train_y, image[keep], y)
                records.append(rec(f"{dataset}/{task}", "linear_probe", {**lp, "n_train": len(train_keep)}))
    return records
