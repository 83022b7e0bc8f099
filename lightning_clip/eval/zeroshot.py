"""CLIP-style zero-shot classification: classify an image by the class whose prompt it matches best.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
Sec. 3.1.4: each class name is written into several prompt templates ("a photo of a {}."), the text
embeddings are L2-normalised and averaged over templates, the mean is re-normalised (the prompt
ensemble), and an image is given the class of highest cosine similarity. CLIP_benchmark's
``zero_shot_classifier`` / ``evaluate`` do the same and report top-1 and mean per-class recall.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.losses.base import cosine_similarity

TextEmbedFn = Callable[[list[str]], Tensor]  # n strings -> [n, D] embeddings (normalised or not)


def _template_embeddings(text_embed_fn: TextEmbedFn, classnames: Sequence[str],
                         templates: Sequence[str]) -> Tensor:
    """``[C, T, D]``: the L2-normalised embedding of every template filled with every class name.
    One call per class, as CLIP's reference code does, so a call holds T texts whatever C is."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    out = []
    for name in classnames:
        emb = text_embed_fn([t.format(name) for t in templates])
        if emb.dim() != 2 or emb.shape[0] != len(templates):
            raise ValueError(f"text_embed_fn returned {tuple(emb.shape)} for {len(templates)} texts; expected [n, D]")
        out.append(F.normalize(emb.detach().float(), dim=-1))
    return torch.stack(out)


def _ensemble(per_template: Tensor) -> Tensor:
    """``[C, T, D]`` -> ``[C, D]``: mean of the normalised template embeddings, re-normalised."""
    return F.normalize(per_template.mean(1), dim=-1)


def class_embeddings(text_embed_fn: TextEmbedFn, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``[C, D]`` zero-shot classifier weights: for class c, ``normalise(mean_t normalise(
    text_embed_fn(templates[t].format(classnames[c]))))`` (CLIP's prompt ensemble)."""
    return _ensemble(_template_embeddings(text_embed_fn, classnames, templates))


def zero_shot_scores(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """``[N, C]`` cosine similarities between images and class embeddings (both normalised here; CLIP's
    logit scale is left out, it changes no argmax)."""
    return cosine_similarity(image_emb, class_emb)


def accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``top1``: share of rows whose argmax is the label (ties go to the lowest class index, as
    ``torch.argmax`` does); ``mean_per_class``: balanced accuracy, the mean over the classes present in
    ``labels`` of the share of that class's rows predicted correctly."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],) or labels.numel() == 0:
        raise ValueError(f"expected [N, C] logits and N labels (N > 0), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.to(logits.device).long()
    correct = (logits.argmax(1) == labels).double()
    present, inverse = torch.unique(labels, return_inverse=True)
    per_class = torch.zeros(len(present), dtype=torch.float64, device=logits.device).index_add_(0, inverse, correct)
    per_class /= torch.bincount(inverse, minlength=len(present))
    return {"top1": float(correct.mean()), "mean_per_class": float(per_class.mean())}


def evaluate_zero_shot(image_emb: Tensor, labels: Tensor, text_embed_fn: TextEmbedFn,
                       classnames: Sequence[str], templates: Sequence[str]) -> dict[str, float]:
    """Zero-shot accuracy of each template alone (``template/<i>/top1``, ``template/<i>/mean_per_class``,
    i = position in ``templates``) and of their ensemble (``top1``, ``mean_per_class``). Every text is
    embedded once."""
    per_template = _template_embeddings(text_embed_fn, classnames, templates).to(image_emb.device)
    out = {}
    for i in range(len(templates)):
        for key, value in accuracy(zero_shot_scores(image_emb, per_template[:, i]), labels).items():
            out[f"template/{i}/{key}"] = value
    out.update(accuracy(zero_shot_scores(image_emb, _ensemble(per_template)), labels))
    return out
