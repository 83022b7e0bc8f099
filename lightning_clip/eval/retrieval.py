"""Retrieval math: recall@k, median / mean rank, semantic recall@k, as pure functions and a torchmetrics
`Metric` that gathers every rank's validation embeddings.

Definitions (the same in both directions):

- The **rank** of a query is the 1-based position of its best-scoring positive among all candidates.
- **Ties are counted pessimistically**: a negative scoring *exactly the same* as the best positive is
  ranked ahead of it, so ``rank = 1 + #{negatives with score >= best positive score}``. Other positives that
  tie do not push the rank. Why pessimistic: the usual ``1 + #{score > best}`` makes a collapsed model (the
  towers output one vector for everything, every score equal) look perfect, R@1 = 1; here it scores last.
  With continuous embeddings exact ties are otherwise rare, so the choice only matters when something is
  broken. ``ties="optimistic"`` gives the usual rule for comparison with other code.
- **Image to text** (i2t): the query is an image, positives are *all* of its captions; it is a hit at k
  when any of them ranks within k (the rank is the best positive's).
- **Text to image** (t2i): the query is a caption, the positive is the image it was written for.
- **Semantic recall@k**: positives are every item the relevance oracle says matches (plus the paired ones,
  which always match), so a correct but unpaired answer is not punished. The gap between plain and
  semantic recall shows how much the plain metric undercounts on the generated world.
- Recall values are fractions in [0, 1]; the median rank interpolates like ``numpy.median``.
- **Oracle ceiling** (`oracle_ceiling`): the expected R@1 of a perfect scorer, score = relevance (the
  oracle's, with the paired items always relevant) and ties broken uniformly at random. A vague caption
  ("a red thing") that fits several images cannot be placed on its own one even by a perfect model: per
  caption the chance is |own images| / |accepted images|, per image |own captions| / |accepted captions|,
  averaged over the queries. Plain R@1 can exceed it only by luck (or by learning the pairing noise).

Memory: scores are computed ``chunk_size`` queries at a time and only the ranks are kept, so 25,000 images
x 125,000 captions never materialise (a chunk of 1,024 image queries against 125,000 captions is 0.5 GB
in float32). The semantic relevance matrix, when given, is a full ``[n_texts, n_images]`` bool matrix:
fine for the synthetic world's validation split, which is the only data that has one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_clip.dedup import first_occurrences
from lightning_clip.losses.base import cosine_similarity

#: ``similarity(image, text, image_ln_std, text_ln_std) -> [N_image, N_text]`` (``ContrastiveLoss.similarity``).
#: One that also takes a ``direction`` keyword is told which side queries ("i2t": image rows rank captions,
#: "t2i": caption columns rank images), for families whose two directions score differently (filip).
Similarity = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tensor]
#: ``relevance(image_ids, text_ids) -> bool [N_text, N_image]`` or None when the data has no oracle
RelevanceFn = Callable[[Tensor, Tensor], Optional[Tensor]]

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 1024


def caption_ids(meta: dict, n: int) -> Tensor:
    """One id per caption item: the data's own ``text_id`` when it has one, else a process-independent hash
    of (sample key, caption text). Equal (image_id, caption id) pairs are one item (distributed padding)."""
    if meta.get("text_id") is not None:
        return torch.as_tensor(meta["text_id"], dtype=torch.long).reshape(n)
    keys, captions = meta.get("key"), meta.get("caption")
    if keys is None and captions is None:
        raise KeyError("retrieval needs meta['text_id'], meta['key'] or meta['caption'] to tell caption items apart")
    from lightning_clip.data.synthetic import stable_id  # the project's one cross-process string hash

    keys = keys if keys is not None else [""] * n
    captions = captions if captions is not None else [""] * n
    return torch.tensor([stable_id(f"{k}\x1f{c}") for k, c in zip(keys, captions)], dtype=torch.long)


def oracle_relevance(constraints: Optional[Sequence[Optional[dict]]],
                     scenes: Optional[Sequence[Optional[dict]]]) -> Optional[Tensor]:
    """The synthetic world's oracle, bool ``[Nt, Ni]`` (caption j true of image i), from each caption's
    constraints and each image's scene; None unless every item has them (real data has none)."""
    if constraints is None or scenes is None or any(c is None for c in constraints) or any(s is None for s in scenes):
        return None
    from lightning_clip.data.oracle import relevance_matrix

    return relevance_matrix(constraints, scenes)


# -- pure functions ----------------------------------------------------------------------------------
def _takes_direction(sim: Callable) -> bool:
    try:
        return "direction" in inspect.signature(sim).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no keyword
        return False


def retrieval_ranks(scores: Tensor, positives: Tensor, ties: str = "pessimistic") -> Tensor:
    """1-based rank of the best positive of each query.

    scores: float ``[Nq, Nc]``; positives: bool ``[Nq, Nc]`` (every query needs at least one positive).
    Returns long ``[Nq]``. See the module docstring for the tie rule.
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    positives = positives.bool()
    has_pos = positives.any(dim=1)
    if not bool(has_pos.all()):
        bad = torch.nonzero(~has_pos).flatten()[:5].tolist()
        raise ValueError(f"{int((~has_pos).sum())} queries have no positive candidate (first rows: {bad})")
    scores = scores.float()
    best_pos = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    if ties == "pessimistic":
        ahead = (scores >= best_pos) & ~positives
    else:  # no positive can score above the best positive, so counting all items is the same
        ahead = scores > best_pos
    return 1 + ahead.sum(dim=1)


def rank_summary(ranks: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """``{"R@k": fraction of ranks <= k, "median_rank", "mean_rank"}`` as 0-dim float tensors."""
    r = ranks.float()
    out = {f"R@{k}": (r <= k).float().mean() for k in ks}
    out["median_rank"] = torch.quantile(r, 0.5)  # interpolates between the two middle ranks, like numpy
    out["mean_rank"] = r.mean()
    return out


@torch.no_grad()
def oracle_ceiling(relevance: Tensor, image_ids: Tensor, text_image_ids: Tensor) -> dict[str, Tensor]:
    """Expected R@1 of the relevance oracle as a scorer, with uniformly random tie-breaking, per direction.

    relevance: bool ``[Nt, Ni]`` (caption j matches image i); ``image_ids`` ``[Ni]`` (deduplicated images),
    ``text_image_ids`` ``[Nt]`` (the image each caption was written for). The paired items always count
    as accepted. The oracle scores s(c, i) = [c accepts i] / |images c accepts|: a caption is worth more
    the fewer images it fits.

    - t2i: per caption, every accepted image gets the same score, so the best expected R@1 is
      |own images among the accepted| / |accepted images| ("a red thing" cannot be placed on its own
      image when 100 images fit it).
    - i2t: per image, the top-scored captions are its accepted captions that fit the fewest images; R@1
      is |own captions among them| / |them|. (Plain |own| / |accepted| would not be a ceiling: a model
      that prefers the most specific caption beats it by 10x.)

    Returns ``{"t2i/R@1", "i2t/R@1"}`` as 0-dim float tensors. A query with nothing accepted scores 0.
    """
    n_txt, n_img = text_image_ids.numel(), image_ids.numel()
    if tuple(relevance.shape) != (n_txt, n_img):
        raise ValueError(f"relevance must be [n_texts={n_txt}, n_images={n_img}], got {tuple(relevance.shape)}")
    if n_txt == 0 or n_img == 0:
        raise ValueError(f"the ceiling needs at least one image and one caption, got {n_img} and {n_txt}")
    own = text_image_ids.reshape(-1, 1).to(image_ids.device) == image_ids.reshape(1, -1)
    accepted = own | relevance.to(own.device, torch.bool)
    t2i = own.sum(1).double() / accepted.sum(1).double().clamp_min(1)
    # i2t: among the captions accepted for image i, those accepting the fewest images score highest
    fits = accepted.sum(1).double()                                           # [Nt] images each caption fits
    masked = torch.where(accepted, fits.reshape(-1, 1), torch.full_like(accepted, float("inf"), dtype=fits.dtype))
    top = accepted & (masked == masked.min(0, keepdim=True).values)           # [Nt, Ni] top-tied captions
    i2t = (own & top).sum(0).double() / top.sum(0).double().clamp_min(1)
    return {"t2i/R@1": t2i.mean().float(), "i2t/R@1": i2t.mean().float()}


def recall_at_1_by_level(ranks: Tensor, levels: Tensor) -> dict[int, Tensor]:
    """R@1 of the queries at each level (caption specificity 1..4 on the synthetic world); levels < 0
    (unknown) are left out. Vague captions fit many images, so their plain R@1 is bounded by the oracle
    ceiling; this shows where a model's recall is lost."""
    hit = (ranks.reshape(-1) <= 1).float()
    levels = levels.reshape(-1).to(hit.device)
    return {int(v): hit[levels == v].mean() for v in torch.unique(levels) if int(v) >= 0}


@dataclass
class RetrievalResult:
    """Everything one validation pass measured. Per-item tensors are aligned with ``image_ids`` (images,
    deduplicated) or ``text_ids`` (captions, deduplicated)."""

    metrics: dict[str, Tensor]
    image_ids: Tensor
    text_ids: Tensor
    i2t_ranks: Tensor
    t2i_ranks: Tensor
    image_ln_std: Optional[Tensor] = None
    text_ln_std: Optional[Tensor] = None
    image_extra: dict[str, Tensor] = field(default_factory=dict)
    text_extra: dict[str, Tensor] = field(default_factory=dict)
    #: the image each caption (``text_ids`` order) was written for, and the oracle's relevance
    #: ``[Nt, Ni]`` when the data has one (for `oracle_ceiling`)
    text_image_ids: Optional[Tensor] = None
    relevance: Optional[Tensor] = None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def retrieval_metrics(image: Tensor, text: Tensor, image_ids: Tensor, text_image_ids: Tensor, *,
                      similarity: Optional[Similarity] = None, image_ln_std: Optional[Tensor] = None,
                      text_ln_std: Optional[Tensor] = None, relevance: Optional[Tensor] = None,
                      ks: Iterable[int] = DEFAULT_KS, chunk_size: int = DEFAULT_CHUNK,
                      ties: str = "pessimistic") -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Recall@k and ranks for *deduplicated* images ``[Ni, D]`` and captions ``[Nt, D]`` (any per-item
    tensors the similarity reads, one row per item: filip passes its tokens ``[Ni, R, 1 + D]``).

    ``image_ids[i]`` names image i; ``text_image_ids[j]`` names the image caption j was written for.
    ``relevance``: optional bool ``[Nt, Ni]`` (caption j matches image i) for semantic recall.
    Returns ``(metrics, i2t_ranks [Ni], t2i_ranks [Nt])`` with keys ``i2t/R@k``, ``i2t/median_rank``,
    ``i2t/mean_rank``, the same for ``t2i/``, and ``semantic/i2t/R@k``, ``semantic/t2i/R@k`` when
    ``relevance`` is given.
    """
    ks = tuple(ks)
    sim = similarity or cosine_similarity
    n_img, n_txt = image.shape[0], text.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n_img} and {n_txt}")
    if relevance is not None and tuple(relevance.shape) != (n_txt, n_img):
        raise ValueError(f"relevance must be [n_texts={n_txt}, n_images={n_img}], got {tuple(relevance.shape)}")
    if relevance is not None:
        relevance = relevance.to(image.device, torch.bool)

    def _sl(x, s):
        return None if x is None else x[s]

    directional = _takes_direction(sim)

    def score(direction, *args):
        return sim(*args, direction=direction) if directional else sim(*args)

    i2t, t2i, sem_i2t, sem_t2i = [], [], [], []
    # image queries against every caption
    for s in _chunks(n_img, chunk_size):
        scores = score("i2t", image[s], text, _sl(image_ln_std, s), text_ln_std)
        pos = image_ids[s, None] == text_image_ids[None, :]
        i2t.append(retrieval_ranks(scores, pos, ties))
        if relevance is not None:
            sem_i2t.append(retrieval_ranks(scores, pos | relevance[:, s].T, ties))
    # caption queries against every image
    for s in _chunks(n_txt, chunk_size):
        scores = score("t2i", image, text[s], image_ln_std, _sl(text_ln_std, s)).T
        pos = text_image_ids[s, None] == image_ids[None, :]
        t2i.append(retrieval_ranks(scores, pos, ties))
        if relevance is not None:
            sem_t2i.append(retrieval_ranks(scores, pos | relevance[s], ties))

    i2t_ranks, t2i_ranks = torch.cat(i2t), torch.cat(t2i)
    out = {f"i2t/{k}": v for k, v in rank_summary(i2t_ranks, ks).items()}
    out.update({f"t2i/{k}": v for k, v in rank_summary(t2i_ranks, ks).items()})
    if relevance is not None:
        for direction, ranks in (("i2t", torch.cat(sem_i2t)), ("t2i", torch.cat(sem_t2i))):
            r = ranks.float()
            out.update({f"semantic/{direction}/R@{k}": (r <= k).float().mean() for k in ks})
    return out, i2t_ranks, t2i_ranks


# -- the distributed Metric --------------------------------------------------------------------------
def _cat_state(state) -> Optional[Tensor]:
    """A list state after `compute`'s sync is a tensor (several ranks) or a list (one process); an unused
    optional state is an empty list or an empty tensor. None when nothing was recorded."""
    if isinstance(state, list):
        return torch.cat(state) if state else None
    return state if state.numel() else None


class RetrievalMetric(Metric):
    """Accumulates one validation epoch of (image, caption) items and computes `retrieval_metrics`.

    ``update`` takes per-item tensors for a batch: image and text embeddings ``[B, D]``, ``image_id``
    ``[B]`` (the same for every caption of one image), ``text_id`` ``[B]`` (one per caption item; equal
    (image_id, text_id) pairs are treated as one item), optional log-std ``[B]`` and optional per-item
    extras (e.g. ``text_specificity``, declared in ``text_extras``), which come back deduplicated in
    `RetrievalResult`. List states with ``dist_reduce_fx="cat"`` gather every rank's items; ``compute``
    then keeps one row per image id and per (image id, text id), which removes the repeats of the
    validation layout and the duplicates added by distributed padding.

    ``relevance_fn(image_ids, text_ids) -> bool [Nt, Ni]`` (or None) switches on semantic recall; it is an
    attribute so a callback can point it at data it collects alongside. ``compute`` returns the metrics
    dict; the full `RetrievalResult` (ranks per item) is kept in ``last_result``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, similarity: Optional[Similarity] = None, ks: Iterable[int] = DEFAULT_KS,
                 chunk_size: int = DEFAULT_CHUNK, relevance_fn: Optional[RelevanceFn] = None,
                 image_extras: Sequence[str] = (), text_extras: Sequence[str] = (),
                 ties: str = "pessimistic", **kwargs):
        super().__init__(**kwargs)
        self.similarity = similarity
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.relevance_fn = relevance_fn
        self.ties = ties
        self.image_extras, self.text_extras = tuple(image_extras), tuple(text_extras)
        for name in ("image", "text", "image_id", "text_id", "image_ln_std", "text_ln_std",
                     *(f"image_{e}" for e in self.image_extras), *(f"text_{e}" for e in self.text_extras)):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.last_result: Optional[RetrievalResult] = None

    def update(self, image: Tensor, text: Tensor, image_id: Tensor, text_id: Tensor,
               image_ln_std: Optional[Tensor] = None, text_ln_std: Optional[Tensor] = None,
               **extras: Tensor) -> None:
        n = image.shape[0]
        if not (text.shape[0] == image_id.shape[0] == text_id.shape[0] == n):
            raise ValueError(f"image {tuple(image.shape)}, text {tuple(text.shape)}, image_id "
                             f"{tuple(image_id.shape)} and text_id {tuple(text_id.shape)} need one row per item")
        unknown = set(extras) - {f"image_{e}" for e in self.image_extras} - {f"text_{e}" for e in self.text_extras}
        if unknown:
            raise ValueError(f"unknown extras {sorted(unknown)}; declared image_extras={self.image_extras}, "
                             f"text_extras={self.text_extras}")
        def keep(state: str, x: Tensor, dtype=None) -> None:
            getattr(self, state).append(x.detach().to(self.device, dtype))

        keep("image", image, torch.float32)
        keep("text", text, torch.float32)
        keep("image_id", image_id.reshape(n), torch.long)
        keep("text_id", text_id.reshape(n), torch.long)
        if image_ln_std is not None:
            keep("image_ln_std", image_ln_std.reshape(n), torch.float32)
        if text_ln_std is not None:
            keep("text_ln_std", text_ln_std.reshape(n), torch.float32)
        for name, value in extras.items():  # give each declared extra in every update, or never
            keep(name, value.reshape(n))

    def compute(self) -> dict[str, Tensor]:
        image, text = _cat_state(self.image), _cat_state(self.text)
        if image is None:
            raise RuntimeError("RetrievalMetric.compute() called before any update()")
        image_id, text_id = _cat_state(self.image_id).long(), _cat_state(self.text_id).long()
        image_ln_std, text_ln_std = _cat_state(self.image_ln_std), _cat_state(self.text_ln_std)

        img_rows = first_occurrences(image_id)
        # a caption item is identified by its image and its own id; a pair seen twice is a padding duplicate
        pair = torch.stack([image_id, text_id], dim=1)
        _, inverse = torch.unique(pair, dim=0, return_inverse=True)
        txt_rows = first_occurrences(inverse)

        def pick(x, rows):
            return None if x is None else x[rows]

        result_ids = (image_id[img_rows], text_id[txt_rows])
        relevance = self.relevance_fn(*result_ids) if self.relevance_fn is not None else None
        metrics, i2t, t2i = retrieval_metrics(
            image[img_rows], text[txt_rows], image_id[img_rows], image_id[txt_rows],
            similarity=self.similarity, image_ln_std=pick(image_ln_std, img_rows),
            text_ln_std=pick(text_ln_std, txt_rows), relevance=relevance, ks=self.ks,
            chunk_size=self.chunk_size, ties=self.ties)
        self.last_result = RetrievalResult(
            metrics=metrics, image_ids=result_ids[0], text_ids=result_ids[1], i2t_ranks=i2t, t2i_ranks=t2i,
            image_ln_std=pick(image_ln_std, img_rows), text_ln_std=pick(text_ln_std, txt_rows),
            image_extra={e: pick(_cat_state(getattr(self, f"image_{e}")), img_rows) for e in self.image_extras},
            text_extra={e: pick(_cat_state(getattr(self, f"text_{e}")), txt_rows) for e in self.text_extras},
            text_image_ids=image_id[txt_rows], relevance=relevance)
        return metrics
