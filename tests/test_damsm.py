"""DAMSM's options (issue 28, item 5): retrieval by its own word-region score R (AttnGAN Eq. 8-10) from
packed tokens, ``terms`` (word / sentence / both levels) and a learned gamma3. Checked against a python
loop over pairs, words and regions written from the paper's equations, closed forms, float64 gradcheck and
the validation callback / evaluation suite fed by a real tiny ClipModule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import random_embeddings, word_mask_for
from lightning_clip.losses import build_loss
from lightning_clip.losses import damsm as D
from lightning_clip.losses import functional as LF
from lightning_clip.losses.base import LOG_SCALE_MAX
from lightning_clip.outputs import Embeddings


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def brute_relevance(regions, region_mask, words, word_mask, g1=4.0, g2=5.0):
    """R(a, b) for every pair by loops, straight from Eq. 8-10: the region context c_l is formed explicitly
    (the implementation expands its norm through a Gram matrix instead)."""
    regions, words = regions.tolist(), words.tolist()
    rmask, wmask = region_mask.tolist(), word_mask.tolist()
    out = []
    for a in range(len(regions)):
        v = [regions[a][r] for r in range(len(regions[a])) if rmask[a][r]]
        row = []
        for b in range(len(words)):
            e = [words[b][l] for l in range(len(words[b])) if wmask[b][l]]
            s = [[sum(x * y for x, y in zip(e[l], v[r])) for r in range(len(v))] for l in range(len(e))]
            # Eq. 8: for each region, a softmax over the words
            sbar = [[math.exp(s[l][r] - lse([s[k][r] for k in range(len(e))])) for r in range(len(v))]
                    for l in range(len(e))]
            cos = []
            for l in range(len(e)):
                # Eq. 9: attention of word l over the regions, and its region context
                alpha = [math.exp(g1 * sbar[l][r] - lse([g1 * x for x in sbar[l]])) for r in range(len(v))]
                c = [sum(alpha[r] * v[r][k] for r in range(len(v))) for k in range(len(v[0]))]
                norm = math.sqrt(sum(x * x for x in c)) * math.sqrt(sum(x * x for x in e[l]))
                cos.append(sum(x * y for x, y in zip(c, e[l])) / norm)
            row.append(lse([g2 * x for x in cos]) / g2)                   # Eq. 10
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def local_embeddings(n=5, regions=4, words=6, dim=3, seed=0):
    """Raw (unnormalised, norms far from 1) regions and words, both sides padded."""
    emb = random_embeddings(n=n, dim=dim, regions=regions, words=words, seed=seed, groups=False)
    g = torch.Generator().manual_seed(seed + 1)
    emb.regions = emb.regions * (0.5 + 2 * torch.rand(n, regions, 1, generator=g, dtype=torch.float64))
    emb.region_mask = word_mask_for(n, regions, g)
    return emb


# -- the retrieval score ----------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [None, "i2t", "t2i"])
def test_similarity_from_packed_tokens_is_r_of_eq_8_to_10(direction):
    emb = local_embeddings()
    module = build_loss("damsm", retrieval="word")
    pi, pt = module.retrieval_inputs(emb)
    assert pi.shape == (5, 4, 4) and pt.shape == (5, 6, 4) and pi.dtype == torch.float64
    sim = module.similarity(pi, pt, direction=direction)
    r = D.word_relevance(emb.regions, emb.region_mask, emb.words, emb.word_mask)
    torch.testing.assert_close(sim, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sim, brute_relevance(emb.regions, emb.region_mask, emb.words, emb.word_mask),
                               rtol=1e-10, atol=1e-12)
    # raw features: R is not invariant to the tokens' norms (Eq. 8's softmax reads raw dot products), so
    # packing them normalised, as filip does, would rank by another score
    unit = module.similarity(*(D.pack_tokens(F.normalize(t, dim=-1), m) for t, m in
                               ((emb.regions, emb.region_mask), (emb.words, emb.word_mask))))
    assert not torch.allclose(unit, sim, rtol=1e-3)


def test_gammas_reach_the_retrieval_score():
    emb = local_embeddings()
    module = build_loss("damsm", gamma1=2.0, gamma2=7.0, retrieval="word")
    sim = module.similarity(*module.retrieval_inputs(emb))
    torch.testing.assert_close(sim, brute_relevance(emb.regions, emb.region_mask, emb.words, emb.word_mask,
                                                    2.0, 7.0), rtol=1e-10, atol=1e-12)


def test_blockwise_equals_one_shot_across_block_boundaries(monkeypatch):
    # 67 images: rows of 64 and 3; a block of 2 caption columns: columns 2, 2, 1
    emb = local_embeddings(n=67, regions=3, words=4, dim=3, seed=3)
    x, xm, y, ym = emb.regions, emb.region_mask, emb.words[:5], emb.word_mask[:5]
    one = D.word_relevance(x, xm, y, ym)
    blocks = D.word_relevance_blocks(x, xm, y, ym, block=64 * 12 * 2)
    torch.testing.assert_close(blocks, one, rtol=1e-12, atol=1e-12)
    # the module's similarity reads the module-level block size at call time
    module = build_loss("damsm", retrieval="word")
    monkeypatch.setattr(D, "_BLOCK", 1)  # one pair per block
    pi, pt = D.pack_tokens(x, xm), D.pack_tokens(y, ym)
    torch.testing.assert_close(module.similarity(pi, pt), one, rtol=1e-12, atol=1e-12)


def test_padding_changes_nothing():
    emb = local_embeddings()
    module = build_loss("damsm", retrieval="word")
    pi, pt = module.retrieval_inputs(emb)
    garbage = Embeddings(**{**emb.__dict__,
                            "words": emb.words.masked_fill(~emb.word_mask[..., None], 1e3),
                            "regions": emb.regions.masked_fill(~emb.region_mask[..., None], -7e2)})
    gi, gt = module.retrieval_inputs(garbage)
    assert torch.equal(gi, pi) and torch.equal(gt, pt)
    # more padding positions (a longer max_length): the same scores
    longer = Embeddings(**{**emb.__dict__, "words": F.pad(emb.words, (0, 0, 0, 3), value=9.0),
                           "word_mask": F.pad(emb.word_mask, (0, 3), value=False),
                           "regions": F.pad(emb.regions, (0, 0, 0, 2), value=-5.0),
                           "region_mask": F.pad(emb.region_mask, (0, 2), value=False)})
    torch.testing.assert_close(module.similarity(*module.retrieval_inputs(longer)), module.similarity(pi, pt),
                               rtol=1e-12, atol=1e-12)


def test_retrieval_modes_sentence_and_both():
    emb = local_embeddings()
    r = D.word_relevance(emb.regions, emb.region_mask, emb.words, emb.word_mask)
    cos = F.normalize(emb.image, dim=-1) @ F.normalize(emb.text, dim=-1).T
    sentence = build_loss("damsm", retrieval="sentence")
    image, text = sentence.retrieval_inputs(emb)
    assert image is emb.image and text is emb.text  # evaluation keeps no extra tensors: the pooled cosine
    torch.testing.assert_close(sentence.similarity(image, text), cos.float())
    both = build_loss("damsm", retrieval="both")
    pi, pt = both.retrieval_inputs(emb)
    assert pi.shape == (5, 1 + 4, 4) and (pi[:, 0, 0] == 2).all() and torch.equal(pi[:, 0, 1:], emb.image)
    torch.testing.assert_close(both.similarity(pi, pt), r + cos, rtol=1e-12, atol=1e-12)
    # the sum ranks as the training logits gamma3 (R + cos) do, whatever gamma3
    assert torch.equal(both.similarity(pi, pt).argsort(1), (10.0 * (r + cos)).argsort(1))
    # without tokens (no local heads) every mode falls back to the pooled cosine
    bare = Embeddings(emb.image, emb.text)
    for module in (build_loss("damsm", retrieval="word"), both):
        torch.testing.assert_close(module.similarity(*module.retrieval_inputs(bare)), cos.float())
    with pytest.raises(ValueError, match="only one side"):
        both.similarity(pi, build_loss("damsm", retrieval="word").retrieval_inputs(emb)[1])


# -- terms ------------------------------------------------------------------------------------------------
def test_terms_give_the_expected_sums():
    emb = local_embeddings(n=6)
    full = build_loss("damsm", retrieval="word")(emb)
    assert set(full.terms) == {"word", "sentence"}
    torch.testing.assert_close(full.loss, full.terms["word"] + full.terms["sentence"])
    # closed forms: sentence = both InfoNCE directions summed at scale gamma3 (2 x their mean);
    # word = the two cross-entropies of gamma3 R, R by the brute-force loop
    unit_i, unit_t = F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)
    torch.testing.assert_close(full.terms["sentence"], 2 * LF.infonce(unit_i, unit_t, 10.0), rtol=1e-12, atol=0)
    r = 10.0 * brute_relevance(emb.regions, emb.region_mask, emb.words, emb.word_mask)
    labels = torch.arange(6)
    word = F.cross_entropy(r, labels) + F.cross_entropy(r.T, labels)
    torch.testing.assert_close(full.terms["word"], word, rtol=1e-10, atol=0)
    only_word = build_loss("damsm", terms="word", retrieval="word")(emb)
    assert set(only_word.terms) == {"word"} and torch.equal(only_word.loss, full.terms["word"])
    only_sentence = build_loss("damsm", terms="sentence", retrieval="sentence")
    assert only_sentence.needs == frozenset()  # ClipModule builds no region/word heads for it
    out = only_sentence(Embeddings(emb.image, emb.text))  # no tokens needed
    assert set(out.terms) == {"sentence"} and torch.equal(out.loss, full.terms["sentence"])
    assert build_loss("damsm", retrieval="word").needs == build_loss("damsm", terms="word", retrieval="word").needs == {"regions", "words"}
    # the pure function agrees with the module
    torch.testing.assert_close(LF.damsm(None, None, None, None, image=emb.image, text=emb.text, terms="sentence"),
                               full.terms["sentence"])


# -- learned gamma3 ---------------------------------------------------------------------------------------
def test_fixed_gamma3_has_no_parameter_and_is_reported():
    fixed = build_loss("damsm", gamma3=12.0)
    assert list(fixed.parameters()) == [] and fixed.state_dict() == {}  # old checkpoints still load
    assert fixed.scalars() == {"scale": 12.0, "log_scale": math.log(12.0)}


def test_learned_gamma3_is_a_clamped_log_scale_without_decay_with_a_gradient():
    module = build_loss("damsm", learn_gamma3=True).double()
    assert module.log_scale.requires_grad and "log_scale" in module.no_decay
    assert module.scalars()["scale"] == pytest.approx(10.0, rel=1e-6)
    emb = local_embeddings(n=5)
    fixed = build_loss("damsm", retrieval="word")(emb)
    out = module(emb)
    # the same loss at init (up to ln 10 stored in float32 before .double())
    torch.testing.assert_close(out.loss, fixed.loss, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(out.loss, module.log_scale)
    assert grad.abs() > 1e-6
    # d loss / d ln gamma3 by central differences, the parameter moved by hand
    eps = 1e-6
    values = []
    for step in (eps, -eps):
        with torch.no_grad():
            module.log_scale.fill_(math.log(10.0) + step)
        values.append(module(emb).loss.item())
    assert grad.item() == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-6)
    with torch.no_grad():
        module.log_scale.fill_(10.0)
    module.clamp_()
    assert module.log_scale.item() == pytest.approx(LOG_SCALE_MAX) and module.gamma3 == pytest.approx(100.0)
    with torch.no_grad():
        module.log_scale.fill_(-1.0)
    module.clamp_()
    assert module.log_scale.item() == 0.0


def test_gradcheck_through_gamma3_float64():
    emb = local_embeddings(n=3, regions=3, words=4, dim=2)
    log_g = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    leaves = [t.detach().clone().requires_grad_() for t in (emb.regions, emb.words, emb.image, emb.text)]

    def fn(lg, regions, words, image, text):
        return LF.damsm(regions, emb.region_mask, words, emb.word_mask, gamma3=lg.exp(), image=image, text=text)

    assert torch.autograd.gradcheck(fn, (log_g, *leaves), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_learned_gamma3_gets_no_weight_decay_in_the_module():
    from test_module import TINY, configured, decay_of

    from lightning_clip.module import ClipModule

    m = ClipModule(loss="damsm", loss_args={"learn_gamma3": True}, weight_decay=0.3, **TINY)
    assert decay_of(configured(m)["optimizer"])[id(m.loss.log_scale)] == 0.0
    sentence = ClipModule(loss="damsm", loss_args={"terms": "sentence", "retrieval": "sentence"}, **TINY)
    assert not hasattr(sentence, "region_head")  # the InfoNCE-shaped model: no untrained heads


# -- option errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"retrieval": "tokens"}, r"damsm: unknown retrieval 'tokens' \(option model\.loss_args\.retrieval\)"),
    ({"terms": "words"}, r"damsm: unknown terms 'words' \(option model\.loss_args\.terms\)"),
    ({"learn_gamma3": "yes"}, r"learn_gamma3 \(option model\.loss_args\.learn_gamma3\) must be true or false"),
    ({"gamma1": 0.0}, r"gamma1 \(option model\.loss_args\.gamma1\) must be a finite number > 0"),
    ({"gamma3": float("nan")}, r"gamma3 \(option model\.loss_args\.gamma3\)"),
    ({"gamma3": 200.0, "learn_gamma3": True}, r"gamma3 \(option model\.loss_args\.gamma3\) must be in \[1, 100\]"),
    ({"terms": "sentence", "retrieval": "word"}, r"retrieval 'word' \(option model\.loss_args\.retrieval\).*"
                                                 r"terms 'sentence'.*set retrieval to one of \('sentence',\)"),
    ({"terms": "word"}, r"retrieval 'sentence' .*terms 'word'.*set retrieval to one of \('word',\)"),
    ({"terms": "word", "retrieval": "both"}, r"ranks by the sentence level"),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss("damsm", **kwargs)


def test_fixed_gamma3_outside_the_clamp_range_is_allowed():
    assert build_loss("damsm", gamma3=0.5).gamma3 == 0.5  # no clamp touches a fixed gamma3


# -- end to end: a tiny ClipModule, the validation callback and the evaluation suite rank by R ------------
def _ranks(scores, positives):
    """1 + negatives scoring >= the best positive (the metric's pessimistic rule), by loops."""
    out = []
    for row, pos in zip(scores.tolist(), positives.tolist()):
        best = max(s for s, p in zip(row, pos) if p)
        out.append(1 + sum(1 for s, p in zip(row, pos) if not p and s >= best))
    return torch.tensor(out)


def _tiny_world(loss_args=None, n_images=6, caps=3, length=7):
    from test_callbacks import meta_of, world
    from test_module import TINY

    from lightning_clip.module import ClipModule

    torch.manual_seed(0)
    m = ClipModule(loss="damsm", loss_args=loss_args, image_model="test_vit",
                   image_model_args={"patch_size": 8}, **TINY).eval()
    items, _, _ = world(n_images=n_images, caps=caps)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n_images, 3, 32, 32, generator=g).repeat_interleave(caps, 0)
    lengths = torch.randint(2, length + 1, (len(items),), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (len(items), length), generator=g) * mask
    batches = []
    for start in range(0, len(items), 5):  # batches cut across images, as a validation loader's do
        s = slice(start, start + 5)
        batches.append(dict(image=pixels[s], input_ids=ids[s], attention_mask=mask[s], meta=meta_of(items[s])))
    return m, items, batches


def test_validation_and_evaluation_rank_by_r_in_a_clip_module():
    from test_callbacks import FakeModule, fake_trainer, meta_of

    from lightning_clip.callbacks import RetrievalCallback
    from lightning_clip.callbacks.retrieval import caption_ids
    from lightning_clip.eval.embed import embed_split
    from lightning_clip.eval.suite import retrieval_record_metrics

    m, items, batches = _tiny_world({"retrieval": "word"})
    with torch.no_grad():
        embs = [m(b) for b in batches]
    regions = torch.cat([e.regions for e in embs]).double()
    words, word_mask = torch.cat([e.words for e in embs]).double(), torch.cat([e.word_mask for e in embs])
    assert regions.shape[1] > 1 and not word_mask.all()  # several regions, padded captions: not a trivial R
    r = brute_relevance(regions[::3], torch.ones(6, regions.shape[1], dtype=torch.bool), words, word_mask)
    own = torch.arange(18) // 3
    i2t = _ranks(r, own[None, :] == torch.arange(6)[:, None])
    t2i = _ranks(r.T, own[:, None] == torch.arange(6)[None, :])

    # the validation callback, fed what validation_step returns
    module = FakeModule(m.loss)
    cb = RetrievalCallback()
    trainer = fake_trainer([cb])
    cb.on_validation_epoch_start(trainer, module)
    for b, e in zip(batches, embs):
        cb.on_validation_batch_end(trainer, module, {"emb": e.map(lambda t: t.detach().float()
                                                                  if t.is_floating_point() else t),
                                                     "meta": b["meta"]}, b, 0)
    cb.on_validation_epoch_end(trainer, module)
    res = cb.result(trainer, module)
    # the metric keeps captions in its own order (by caption id): map them back to the items
    item_of = {int(t): k for k, t in enumerate(caption_ids(meta_of(items), 18))}
    order = torch.tensor([item_of[int(t)] for t in res.text_ids])
    assert torch.equal(res.i2t_ranks, i2t) and torch.equal(res.t2i_ranks, t2i[order])
    assert module.logged["val/t2i/mean_rank"] == pytest.approx(t2i.double().mean().item())
    assert module.logged["val/i2t/R@1"] == pytest.approx((i2t == 1).double().mean().item())

    # the evaluation suite (eval.json's zeroshot_retrieval record): the same ranks from the kept tokens
    split = embed_split(m, batches)
    assert split.image_rank is not None and split.image_rank.shape[:2] == (6, regions.shape[1])
    metrics, ev_i2t, ev_t2i = retrieval_record_metrics(split, m.loss.similarity)
    assert torch.equal(ev_i2t, i2t) and torch.equal(ev_t2i, t2i)
    assert metrics["image_retrieval_recall@1"] == pytest.approx((t2i == 1).double().mean().item())

    # retrieval: sentence on the same weights ranks by the pooled cosine, and differently (not vacuous)
    m.loss.retrieval = "sentence"
    cos_split = embed_split(m, batches)
    assert cos_split.image_rank is None
    cos = F.normalize(cos_split.image, dim=-1) @ F.normalize(cos_split.text, dim=-1).T
    _, cos_i2t, cos_t2i = retrieval_record_metrics(cos_split, m.loss.similarity)
    assert torch.equal(cos_t2i, _ranks(cos.T, own[:, None] == torch.arange(6)[None, :]))
    assert not torch.equal(cos_t2i, t2i)


def test_the_default_ranks_by_the_pooled_cosine_as_the_losses_runs_did():
    emb = local_embeddings()
    module = build_loss("damsm")
    assert module.retrieval == "sentence"
    image, text = module.retrieval_inputs(emb)
    assert image.shape == emb.image.shape and torch.equal(text, emb.text)
