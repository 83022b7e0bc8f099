"""Retrieval metrics against hand-computed values and a brute-force (python loops) implementation."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from lightning_clip.dedup import first_occurrences
from lightning_clip.eval.retrieval import (RetrievalMetric, oracle_ceiling, rank_summary, retrieval_metrics,
                                           retrieval_ranks)


# -- brute force: sort every candidate list, negatives first among equal scores (the pessimistic rule) ---
def brute_ranks(scores, positives):
    ranks = []
    for s, p in zip(scores.tolist(), positives.tolist()):
        order = sorted(range(len(s)), key=lambda c: (-s[c], p[c]))  # p False (negative) sorts first on ties
        ranks.append(1 + next(i for i, c in enumerate(order) if p[c]))
    return ranks


def brute_metrics(image, text, image_ids, text_image_ids, relevance=None, ks=(1, 5, 10)):
    img = torch.nn.functional.normalize(image, dim=-1)
    txt = torch.nn.functional.normalize(text, dim=-1)
    scores = img @ txt.T
    pos = image_ids[:, None] == text_image_ids[None, :]
    out = {}
    for name, s, p, rel in (("i2t", scores, pos, None if relevance is None else relevance.T),
                            ("t2i", scores.T, pos.T, relevance)):
        r = brute_ranks(s, p)
        out.update({f"{name}/R@{k}": sum(x <= k for x in r) / len(r) for k in ks})
        out[f"{name}/median_rank"] = statistics.median(r)
        out[f"{name}/mean_rank"] = sum(r) / len(r)
        if rel is not None:
            r = brute_ranks(s, p | rel)
            out.update({f"semantic/{name}/R@{k}": sum(x <= k for x in r) / len(r) for k in ks})
    return out


def assert_metrics_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], abs=1e-6), k


# -- hand-computed -------------------------------------------------------------------------------------
def test_ranks_hand_computed_multi_caption_and_ties():
    # 3 image queries x 4 captions; image 0 owns captions 0-1, image 1 owns 2-3, image 2 owns caption 3 too
    scores = torch.tensor([
        [0.1, 0.9, 0.95, 0.2],   # best positive 0.9 (caption 1); caption 2 scores above -> rank 2
        [0.4, 0.3, 0.4, 0.1],    # best positive 0.4 (caption 2) ties negative caption 0
        [0.7, 0.7, 0.2, 0.7],    # positive caption 3 ties two negatives
    ])
    positives = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert retrieval_ranks(scores, positives).tolist() == [2, 2, 3]
    assert retrieval_ranks(scores, positives, ties="optimistic").tolist() == [2, 1, 1]
    assert brute_ranks(scores, positives) == [2, 2, 3]


def test_tied_positives_do_not_push_each_other():
    scores = torch.tensor([[0.7, 0.7, 0.7, 0.2]])
    positives = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    assert retrieval_ranks(scores, positives).tolist() == [2]   # only the tied negative is ahead
    assert retrieval_ranks(scores, positives, ties="optimistic").tolist() == [1]


def test_collapsed_embeddings_score_last_not_first():
    # every tower output identical: all scores tie; the pessimistic rule must not report perfect recall
    n = 6
    image = torch.ones(n, 4)
    text = torch.ones(2 * n, 4)
    ids = torch.arange(n)
    m, i2t, t2i = retrieval_metrics(image, text, ids, ids.repeat_interleave(2))
    assert t2i.tolist() == [n] * (2 * n)             # the positive image after the n - 1 tied negatives
    assert i2t.tolist() == [2 * n - 1] * n            # after the 2n - 2 negative captions
    assert float(m["t2i/R@1"]) == 0.0 and float(m["i2t/R@1"]) == 0.0


def test_rank_summary_hand_computed():
    out = rank_summary(torch.tensor([1, 2, 6, 11]), ks=(1, 5, 10))
    assert float(out["R@1"]) == 0.25
    assert float(out["R@5"]) == 0.5
    assert float(out["R@10"]) == 0.75
    assert float(out["median_rank"]) == 4.0           # mean of the two middle ranks, like numpy
    assert float(out["mean_rank"]) == 5.0


def test_metrics_hand_computed_two_images_four_captions():
    # 2-D unit vectors so cosine scores are easy to read off; image A = x axis, image B = y axis
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image_ids = torch.tensor([10, 20])
    angle = lambda deg: [math.cos(math.radians(deg)), math.sin(math.radians(deg))]  # noqa: E731
    # captions of A at 10 and 80 degrees, captions of B at 30 and 85 degrees
    text = torch.tensor([angle(10), angle(80), angle(30), angle(85)])
    text_image_ids = torch.tensor([10, 10, 20, 20])
    m, i2t, t2i = retrieval_metrics(image, text, image_ids, text_image_ids, ks=(1, 2))
    # A ranks captions 10,30,80,85 -> its best caption (10) first; B ranks 85,80,30,10 -> its 85 first
    assert i2t.tolist() == [1, 1]
    # caption 10 -> A (rank 1); 80 -> B first (rank 2); 30 -> A first (rank 2); 85 -> B (rank 1)
    assert t2i.tolist() == [1, 2, 2, 1]
    assert float(m["i2t/R@1"]) == 1.0
    assert float(m["t2i/R@1"]) == 0.5 and float(m["t2i/R@2"]) == 1.0
    assert float(m["t2i/median_rank"]) == 1.5 and float(m["t2i/mean_rank"]) == 1.5
    assert not any(k.startswith("semantic/") for k in m)


def test_semantic_recall_with_hand_made_relevance():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ids = torch.tensor([0, 1, 2])
    # caption 0 (paired with image 0) points at image 1; caption 1 at image 1; caption 2 at image 0
    text = torch.tensor([[0.1, 1.0], [0.0, 1.0], [1.0, 0.1]])
    relevance = torch.tensor([[0, 1, 0],     # caption 0 truly matches image 1 as well
                              [0, 0, 1],     # caption 1 also matches image 2
                              [0, 0, 0]], dtype=torch.bool)  # caption 2's top image 0 is not relevant
    m, i2t, t2i = retrieval_metrics(image, text, ids, ids, relevance=relevance, ks=(1,))
    # t2i: caption 0 ranks image 1 first (rank 2), caption 1 -> image 1 (rank 1), caption 2 -> image 0
    # first, then image 1, then its own image 2 (rank 3)
    assert t2i.tolist() == [2, 1, 3]
    assert float(m["t2i/R@1"]) == pytest.approx(1 / 3)
    assert float(m["semantic/t2i/R@1"]) == pytest.approx(2 / 3)   # caption 0 now hits through image 1
    # i2t: image 0 ranks caption 2 (unpaired, not relevant) above its caption 0 -> rank 2; image 1 ranks
    # its caption 1 first -> 1; image 2 (-x) ranks caption 1 (0 score) first, its caption 2 last -> 3
    assert i2t.tolist() == [2, 1, 3]
    assert float(m["i2t/R@1"]) == pytest.approx(1 / 3)
    assert float(m["semantic/i2t/R@1"]) == pytest.approx(2 / 3)   # image 2 <- caption 1 counts too
    assert_metrics_equal(m, brute_metrics(image, text, ids, ids, relevance, ks=(1,)))


def test_queries_without_positive_are_an_error():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))


# -- random inputs: brute force, chunking -------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, caps, d = 23, 3, 8
    image = torch.randn(n_img, d, generator=g)
    text = image.repeat_interleave(caps, 0) + 1.5 * torch.randn(n_img * caps, d, generator=g)
    # round scores a little so that real ties happen
    text = (text * 2).round() / 2
    image_ids = torch.randperm(1000, generator=g)[:n_img]
    text_image_ids = image_ids.repeat_interleave(caps)
    relevance = torch.rand(n_img * caps, n_img, generator=g) < 0.1
    m, _, _ = retrieval_metrics(image, text, image_ids, text_image_ids, relevance=relevance)
    assert_metrics_equal(m, brute_metrics(image, text, image_ids, text_image_ids, relevance))


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(37, 16, generator=g), torch.randn(111, 16, generator=g)
    ids = torch.arange(37)
    relevance = torch.rand(111, 37, generator=g) < 0.2
    whole = retrieval_metrics(image, text, ids, ids.repeat_interleave(3), relevance=relevance, chunk_size=10_000)
    for chunk in (1, 7, 36):
        part = retrieval_metrics(image, text, ids, ids.repeat_interleave(3), relevance=relevance, chunk_size=chunk)
        assert part[0].keys() == whole[0].keys()
        for k in whole[0]:
            assert torch.equal(part[0][k], whole[0][k]), (chunk, k)
        assert torch.equal(part[1], whole[1]) and torch.equal(part[2], whole[2])


def test_similarity_callable_receives_chunks_with_variance():
    calls = []

    def sim(image, text, image_ln_std, text_ln_std):
        calls.append((image.shape[0], text.shape[0], image_ln_std.shape[0], text_ln_std.shape[0]))
        return -torch.cdist(image, text)  # any score works; shapes are what this test checks

    image, text = torch.randn(5, 3), torch.randn(5, 3)
    ids = torch.arange(5)
    retrieval_metrics(image, text, ids, ids, similarity=sim, image_ln_std=torch.zeros(5),
                      text_ln_std=torch.zeros(5), chunk_size=2)
    assert calls == [(2, 5, 2, 5), (2, 5, 2, 5), (1, 5, 1, 5), (5, 2, 5, 2), (5, 2, 5, 2), (5, 1, 5, 1)]


# -- the Metric: dedupe, accumulation, extras ------------------------------------------------------------
def test_metric_deduplicates_images_and_padding_duplicates():
    g = torch.Generator().manual_seed(5)
    n_img, caps, d = 9, 5, 6
    image = torch.randn(n_img, d, generator=g)
    text = image.repeat_interleave(caps, 0) + torch.randn(n_img * caps, d, generator=g)
    image_ids = torch.arange(100, 100 + n_img)
    item_image_ids = image_ids.repeat_interleave(caps)
    item_text_ids = torch.arange(n_img * caps) * 7
    items_image = image.repeat_interleave(caps, 0)
    ln_std = torch.linspace(-1, 1, n_img * caps)
    specificity = torch.arange(n_img * caps) % 4 + 1

    metric = RetrievalMetric(ks=(1, 5), chunk_size=4, text_extras=("specificity",))
    # feed in batches of 8 (like a loader) and then replay the first 3 items, like distributed padding
    order = list(range(n_img * caps)) + [0, 1, 2]
    for start in range(0, len(order), 8):
        idx = torch.tensor(order[start:start + 8])
        metric.update(items_image[idx], text[idx], item_image_ids[idx], item_text_ids[idx],
                      text_ln_std=ln_std[idx], text_specificity=specificity[idx])
    got = metric.compute()
    want, _, t2i = retrieval_metrics(image, text, image_ids, item_image_ids, ks=(1, 5))
    assert_metrics_equal(got, {k: float(v) for k, v in want.items()})
    res = metric.last_result
    assert res.image_ids.tolist() == image_ids.tolist()
    assert res.text_ids.numel() == n_img * caps
    # per-caption outputs stay aligned with their ids
    row_of = {int(t): i for i, t in enumerate(item_text_ids)}
    rows = torch.tensor([row_of[int(t)] for t in res.text_ids])
    assert torch.equal(res.text_ln_std, ln_std[rows])
    assert torch.equal(res.text_extra["specificity"], specificity[rows])
    assert torch.equal(res.t2i_ranks, t2i[rows])
    assert res.image_ln_std is None

    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"), pytest.warns(UserWarning):
        metric.compute()


def test_metric_relevance_fn_gets_deduplicated_ids():
    seen = {}

    def relevance_fn(image_ids, txt_ids):
        seen["img"], seen["txt"] = image_ids.tolist(), txt_ids.tolist()
        return torch.ones(txt_ids.numel(), image_ids.numel(), dtype=torch.bool)

    metric = RetrievalMetric(ks=(1,), relevance_fn=relevance_fn)
    image = torch.randn(4, 3)
    metric.update(image, torch.randn(4, 3), torch.tensor([3, 3, 1, 1]), torch.tensor([30, 31, 10, 11]))
    out = metric.compute()
    assert seen == {"img": [1, 3], "txt": [10, 11, 30, 31]}
    assert float(out["semantic/t2i/R@1"]) == 1.0 and float(out["semantic/i2t/R@1"]) == 1.0


def test_metric_rejects_unknown_extras():
    metric = RetrievalMetric()
    with pytest.raises(ValueError, match="unknown extras"):
        metric.update(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), text_foo=torch.zeros(1))


def test_helpers():
    assert first_occurrences(torch.tensor([5, 3, 5, 3, 9])).tolist() == [1, 0, 4]
    ids = torch.tensor([5, 3, 5, 3, 9])
    first, inverse = first_occurrences(ids, return_inverse=True)
    assert first.tolist() == [1, 0, 4] and torch.equal(ids[first][inverse], ids)


# -- the oracle ceiling -----------------------------------------------------------------------------------
def monte_carlo_ceiling(relevance, image_ids, text_image_ids, trials=4000, seed=0):
    """R@1 of the oracle scorer (score = accepted / images the caption fits, ties broken by tiny uniform
    noise), averaged over trials."""
    g = torch.Generator().manual_seed(seed)
    own = text_image_ids[:, None] == image_ids[None, :]
    accepted = (own | relevance).float()
    score = accepted / accepted.sum(1, keepdim=True)  # distinct fit counts differ by >= 1/N^2
    eps = 0.5 / accepted.shape[1] ** 2
    out = {}
    for name, acc, pos in (("t2i", score, own), ("i2t", score.T, own.T)):
        hits = 0.0
        for _ in range(trials // 100):
            noise = torch.rand(100, *acc.shape, generator=g) * eps  # never reorders distinct scores
            top = (acc[None] + noise).argmax(dim=-1)                  # [trials, Nq]
            hits += pos.gather(1, top.T).float().sum().item()
        out[f"{name}/R@1"] = hits / (trials * acc.shape[0])
    return out


def test_oracle_ceiling_hand_built():
    # 3 images, 5 captions: captions 0, 1 of image 0; 2, 3 of image 1; 4 of image 2
    image_ids = torch.tensor([10, 11, 12])
    text_image_ids = torch.tensor([10, 10, 11, 11, 12])
    relevance = torch.tensor([[1, 1, 1],    # vague: fits every image -> 1/3
                              [1, 0, 0],    # specific -> 1
                              [0, 1, 0],    # specific -> 1
                              [0, 0, 0],    # own image only (the oracle missed it) -> 1
                              [0, 1, 1]],   # fits images 1 and 2 -> 1/2
                             dtype=torch.bool)
    c = oracle_ceiling(relevance, image_ids, text_image_ids)
    assert float(c["t2i/R@1"]) == pytest.approx((1 / 3 + 1 + 1 + 1 + 1 / 2) / 5)
    # i2t: the captions fit 3, 1, 1, 1, 2 images. Image 0 accepts {0, 1}: the most specific is 1 (own) -> 1;
    # image 1 accepts {0, 2, 3, 4}: top {2, 3} (own) -> 1; image 2 accepts {0, 4}: top {4} (own) -> 1
    assert float(c["i2t/R@1"]) == pytest.approx(1.0)
    # make caption 1 fit image 1 too and caption 3 fit image 0: image 0's top is now {1, 3} (fit 2 each), one
    # of them its own -> 1/2; image 1's top is {2} -> 1; image 2 unchanged -> 1
    tied = relevance.clone()
    tied[1, 1] = True
    tied[3, 0] = True
    assert float(oracle_ceiling(tied, image_ids, text_image_ids)["i2t/R@1"]) == pytest.approx((1 / 2 + 1 + 1) / 3)
    # a perfect oracle (nothing but the pairs) is 1 in both directions; everything relevant is |own| / N
    none = torch.zeros(5, 3, dtype=torch.bool)
    assert {k: float(v) for k, v in oracle_ceiling(none, image_ids, text_image_ids).items()} == {"t2i/R@1": 1.0,
                                                                                                 "i2t/R@1": 1.0}
    full = oracle_ceiling(torch.ones(5, 3, dtype=torch.bool), image_ids, text_image_ids)
    assert float(full["t2i/R@1"]) == pytest.approx(1 / 3)
    assert float(full["i2t/R@1"]) == pytest.approx((2 + 2 + 1) / 5 / 3)
    with pytest.raises(ValueError, match="relevance must be"):
        oracle_ceiling(relevance.T, image_ids, text_image_ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_ceiling_matches_monte_carlo_tie_breaking(seed):
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(6) * 7
    text_image_ids = image_ids.repeat_interleave(3)[torch.randperm(18, generator=g)]
    relevance = torch.rand(18, 6, generator=g) < 0.35
    want = monte_carlo_ceiling(relevance, image_ids, text_image_ids, seed=seed)
    got = oracle_ceiling(relevance, image_ids, text_image_ids)
    for k in want:  # 4000 trials x 18 (or 6) queries: the standard error is below 0.004
        assert float(got[k]) == pytest.approx(want[k], abs=0.015), k
    assert float(got["t2i/R@1"]) < 0.9  # the random relevance really is vague


def test_metric_result_keeps_relevance_and_caption_images():
    m = RetrievalMetric(relevance_fn=lambda img, txt: torch.ones(txt.numel(), img.numel(), dtype=torch.bool))
    image = torch.randn(4, 3)
    m.update(image, image + 0.1, torch.tensor([5, 5, 6, 6]), torch.tensor([0, 1, 2, 3]))
    m.compute()
    res = m.last_result
    assert res.text_image_ids.tolist() == [5, 5, 6, 6] and res.relevance.shape == (4, 2)
    c = oracle_ceiling(res.relevance, res.image_ids, res.text_image_ids)
    assert float(c["t2i/R@1"]) == pytest.approx(0.5) and float(c["i2t/R@1"]) == pytest.approx(0.5)
