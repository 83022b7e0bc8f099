"""The five later families (issue 15): cyclip, hn_nce, cloob, pcmepp, filip. The generic checks (brute-force
loops, float64 gradcheck, stability, clear errors, DDP) run on every family from `_loss_helpers.CASES`;
here are each family's closed forms and special cases, the authors' code where it differs in form,
padding, per-dimension variances, retrieval scores and the module/callback wiring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import finite_loss_and_grads, random_embeddings
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.cyclip import cyclip_terms
from lightning_clip.losses.filip import token_similarity
from lightning_clip.outputs import Embeddings


def unit(emb):
    return F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)


# -- cyclip ------------------------------------------------------------------------------------------------
def test_cyclip_with_both_lambdas_zero_is_infonce_exactly():
    emb = random_embeddings(n=7)
    image, text = unit(emb)
    assert torch.equal(LF.cyclip(image, text, 14.0, lambda_in=0.0, lambda_cross=0.0), LF.infonce(image, text, 14.0))
    module = build_loss("cyclip", lambda_in=0, lambda_cross=0).double()
    assert torch.equal(module(emb).loss, build_loss("infonce").double()(emb).loss)
    assert not torch.equal(LF.cyclip(image, text, 14.0), LF.infonce(image, text, 14.0))


def test_cyclip_regularisers_closed_forms():
    emb = random_embeddings(n=5)
    image, text = unit(emb)
    # the same features on both sides: both Gram matrices agree and I T^T is symmetric
    terms = cyclip_terms(image, image, 10.0)
    assert terms["in_modal"].item() == 0.0 and terms["cross_modal"].item() == pytest.approx(0.0, abs=1e-28)
    # N * mean over the N^2 entries, as the authors' code (before lambdas)
    terms = cyclip_terms(image, text, 10.0)
    n = image.shape[0]
    gram = image @ image.T - text @ text.T
    cross = image @ text.T - text @ image.T
    assert torch.allclose(terms["in_modal"], n * gram.square().mean(), rtol=1e-13)
    assert torch.allclose(terms["cross_modal"], n * cross.square().mean(), rtol=1e-13)
    expected = (terms["i2t"] + terms["t2i"]) / 2 + 0.3 * terms["in_modal"] + 0.7 * terms["cross_modal"]
    assert torch.equal(LF.cyclip(image, text, 10.0, lambda_in=0.3, lambda_cross=0.7), expected)


# -- hn_nce ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 6])
def test_hn_nce_alpha_1_beta_0_is_infonce(n):
    emb = random_embeddings(n=n, seed=n)
    image, text = unit(emb)
    expected = LF.infonce(image, text, 14.0)
    assert torch.allclose(LF.hn_nce(image, text, 14.0, alpha=1.0, beta=0.0), expected, rtol=1e-13, atol=1e-15)
    module = build_loss("hn_nce", alpha=1.0, beta=0.0).double()
    assert torch.allclose(module(emb).loss, build_loss("infonce").double()(emb).loss, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.5, 2.0), (2.0, -1.0)])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_hn_nce_equal_logits(alpha, beta, n):
    """All logits equal: every weight is 1, L = ln(alpha + N - 1) (ln alpha with no negatives)."""
    image = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1).expand(n, 5)
    text = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1).expand(n, 5)
    loss = LF.hn_nce(image, text, 37.0, alpha=alpha, beta=beta)
    assert loss.item() == pytest.approx(math.log(alpha + n - 1), rel=1e-12, abs=1e-12)


def test_hn_nce_upweights_hard_negatives_and_is_stable_at_scale_100():
    emb = random_embeddings(n=6)
    image, text = unit(emb)
    # beta > 0 puts more weight on high-scoring negatives: the loss rises above InfoNCE's
    assert LF.hn_nce(image, text, 14.0, beta=2.0) > LF.infonce(image, text, 14.0)
    for beta in (-3.0, 0.5, 5.0):
        module = build_loss("hn_nce", beta=beta)
        with torch.no_grad():
            module.log_scale.fill_(math.log(100.0))
        e = random_embeddings(n=8, dim=16, dtype=torch.float32)
        e.text = e.image + 1e-3 * e.text
        finite_loss_and_grads(module, e)


# -- cloob -------------------------------------------------------------------------------------------------
def authors_cloob(image, text, inv_tau, beta):
    """ml-jku/cloob's `cloob`, `infoLOOB_loss` and `hopfield_retrieval` (the Hopfield layer as its
    single-update softmax), in their form: diagonal filled with -10000 before the log-sum-exp."""
    def hopfield(state, stored):
        r = torch.softmax(beta * state @ stored.T, dim=-1) @ stored
        return r / r.norm(dim=1, keepdim=True)

    def info_loob(x, y, i):
        tau = 1 / inv_tau
        k = x @ y.T / tau
        positives = -torch.mean(torch.sum(k * i, dim=1))
        arg_lse = k * torch.logical_not(i) + i * -10000.0
        negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
        return tau * (positives + negatives)

    p_xx, p_yy = hopfield(image, image), hopfield(text, text)
    p_xy, p_yx = hopfield(text, image), hopfield(image, text)
    eye = torch.eye(image.shape[0], dtype=torch.float64)
    return info_loob(p_xx, p_xy, eye) + info_loob(p_yy, p_yx, eye)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_cloob_matches_the_authors_code(n):
    emb = random_embeddings(n=n, dim=6, seed=n)
    image, text = unit(emb)
    for inv_tau, beta in ((30.0, 8.0), (10.0, 14.3)):
        ours = LF.cloob(image, text, inv_tau=inv_tau, hopfield_beta=beta)
        assert torch.allclose(ours, authors_cloob(image, text, inv_tau, beta), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cloob_identical_items(n):
    """Every item equal: every retrieval is that vector, InfoLOOB = tau ln(N - 1) per side (-1 at N = 1,
    where the leave-one-out term has nothing to sum)."""
    v = F.normalize(torch.randn(1, 5, dtype=torch.float64), dim=-1).expand(n, 5)
    loss = LF.cloob(v, v, inv_tau=30.0)
    expected = -2.0 if n == 1 else 2 * math.log(n - 1) / 30.0
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_cloob_temperature_is_fixed_unless_asked():
    assert not build_loss("cloob").log_scale.requires_grad
    learned = build_loss("cloob", learn_inv_tau=True, inv_tau=20.0)
    assert learned.log_scale.requires_grad and learned.scalars()["scale"] == pytest.approx(20.0)


# -- pcmepp ------------------------------------------------------------------------------------------------
def test_pcmepp_isotropic_equals_per_dimension_with_equal_entries():
    emb = random_embeddings(n=5, dim=4)
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    iso = LF.pcmepp(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, a, b, vib_beta=0.2)
    wide = LF.pcmepp(emb.image, emb.text, emb.image_ln_std[:, None].expand(5, 4),
                     emb.text_ln_std[:, None].expand(5, 4), a, b, vib_beta=0.2)
    assert torch.allclose(iso, wide, rtol=1e-13)


def test_pcmepp_per_dimension_variance_against_brute_force():
    from test_losses import brute_pcmepp

    emb = random_embeddings(n=4, dim=3, seed=3)
    g = torch.Generator().manual_seed(0)
    ils, tls = torch.rand(4, 3, generator=g, dtype=torch.float64) - 0.5, torch.rand(4, 3, generator=g,
                                                                                     dtype=torch.float64) - 0.5
    module = build_loss("pcmepp", vib_beta=0.4, init_a=2.0, init_b=-1.0).double()
    got = module(Embeddings(emb.image, emb.text, ils, tls)).loss
    assert got.item() == pytest.approx(brute_pcmepp(emb, module, ils, tls), rel=1e-11)


def test_pcmepp_closed_forms():
    n, d = 3, 4
    zeros = torch.zeros(n, d, dtype=torch.float64)
    # mu = 0, sigma = 1: KL = 0, every d_ij = 2 D, every logit -2 a D + b
    a, b = 0.5, 1.0
    logit = torch.tensor(-2 * a * d + b, dtype=torch.float64)
    expected = (F.softplus(-logit) + (n - 1) * F.softplus(logit)) / n
    loss = LF.pcmepp(zeros, zeros, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                     a, b, vib_beta=10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-13)
    # a = 0: every logit is b, whatever the features
    emb = random_embeddings(n=n)
    loss = LF.pcmepp(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, 0.0, 1.0)
    assert loss.item() == pytest.approx(((F.softplus(torch.tensor(-1.0)) + 2 * F.softplus(torch.tensor(1.0))) / 3)
                                        .item(), rel=1e-6)


def test_pcmepp_similarity_is_minus_the_sampled_distance():
    module = build_loss("pcmepp")
    emb = random_embeddings(n=6, dtype=torch.float32)
    sim = module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    i, t = unit(emb)
    d = torch.cdist(i, t) ** 2 + i.shape[1] * (emb.image_ln_std.exp() ** 2)[:, None] \
        + i.shape[1] * (emb.text_ln_std.exp() ** 2)[None, :]
    assert torch.allclose(sim, -d, rtol=1e-5, atol=1e-5)
    # equal variances: the ranking is the cosine ranking
    zeros = torch.zeros(6)
    assert torch.equal(module.similarity(emb.image, emb.text, zeros, zeros).argsort(1), (i @ t.T).argsort(1))


def test_pcmepp_errors_and_scalars():
    emb = random_embeddings(n=4)
    with pytest.raises(ValueError, match="needs image_ln_std and text_ln_std"):
        build_loss("pcmepp")(Embeddings(emb.image, emb.text))
    with pytest.raises(ValueError, match=r"text_ln_std must have shape \[N\] = \[4\].*or \[N, D\]"):
        LF.pcmepp(emb.image, emb.text, torch.zeros(4), torch.zeros(3), 5.0, 5.0)
    with pytest.raises(ValueError, match="vib_beta"):
        build_loss("pcmepp", vib_beta=-1.0)
    module = build_loss("pcmepp")
    assert module.scalars() == {"a": 5.0, "b": 5.0, "scale": 5.0, "bias": 5.0}
    assert module.a.requires_grad and module.b.requires_grad


def test_pcmepp_builds_variance_heads_and_feeds_the_variance_callback():
    from lightning_clip.callbacks.variance import VarianceCallback
    from lightning_clip.module import ClipModule
    from test_module import TINY, batch

    m = ClipModule(loss="pcmepp", **TINY)
    assert m.with_variance and VarianceCallback.applies_to(m)
    emb = m(batch())
    assert emb.image_ln_std.shape == (4,) and emb.text_ln_std.shape == (4,)
    out = m._compute_loss(emb)
    assert torch.isfinite(out.loss) and {"bce", "vib"} <= set(out.terms)


# -- filip -------------------------------------------------------------------------------------------------
def test_filip_padding_never_enters_a_max_or_a_mean():
    module = build_loss("filip").double()
    emb = random_embeddings(n=5)
    loss = module(emb).loss
    garbage = Embeddings(**{**emb.__dict__, "words": emb.words.masked_fill(~emb.word_mask[..., None], 1e3)})
    assert torch.allclose(module(garbage).loss, loss, rtol=1e-12)
    longer = Embeddings(**{**emb.__dict__, "words": F.pad(emb.words, (0, 0, 0, 3), value=7.0),
                           "word_mask": F.pad(emb.word_mask, (0, 3), value=False),
                           "regions": F.pad(emb.regions, (0, 0, 0, 2), value=-5.0),
                           "region_mask": F.pad(torch.ones(5, 5, dtype=torch.bool), (0, 2), value=False)})
    assert torch.allclose(module(longer).loss, loss, rtol=1e-12)
    # padded regions: against the brute-force loop, and gradients reach no padded token
    from test_losses import brute_filip

    region_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 1],
                                [0, 1, 0, 0, 0]], dtype=torch.bool)
    masked = Embeddings(**{**emb.__dict__, "region_mask": region_mask,
                           "regions": emb.regions.masked_fill(~region_mask[..., None], -1e3)})
    assert module(masked).loss.item() == pytest.approx(brute_filip(masked, module, region_mask), rel=1e-10)
    regions = masked.regions.clone().requires_grad_()
    words = masked.words.clone().requires_grad_()
    LF.filip(F.normalize(regions, dim=-1), region_mask, F.normalize(words, dim=-1), masked.word_mask,
             10.0).backward()
    assert (regions.grad[~region_mask] == 0).all() and (words.grad[~masked.word_mask] == 0).all()


def test_filip_closed_forms():
    emb = random_embeddings(n=6)
    image, text = unit(emb)
    # one token each: both token-wise scores are the cosine, so FILIP is InfoNCE on those tokens
    assert torch.allclose(LF.filip(image[:, None], None, text[:, None], None, 14.0), LF.infonce(image, text, 14.0),
                          rtol=1e-13)
    # None masks are all-real masks
    x, y = F.normalize(emb.regions, dim=-1), F.normalize(emb.words, dim=-1)
    ones_r, ones_w = torch.ones(6, 5, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool)
    assert torch.equal(LF.filip(x, None, y, None, 9.0), LF.filip(x, ones_r, y, ones_w, 9.0))
    # s^I and s^T differ in general (images rank captions by s^I, captions rank images by s^T)
    s_img, s_txt = token_similarity(x, ones_r, y, emb.word_mask)
    assert not torch.allclose(s_img, s_txt)
    # a caption made of exactly one of image 0's tokens: s^T(0, j) = 1 (that word's best region is itself)
    y2 = y.clone()
    y2[2, 0] = x[0, 3]
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, 0] = True
    assert token_similarity(x, ones_r, y2, mask)[1][0, 2].item() == pytest.approx(1.0, rel=1e-12)


def test_filip_errors():
    emb = random_embeddings(n=4)
    with pytest.raises(ValueError, match="needs regions and words"):
        build_loss("filip")(Embeddings(emb.image, emb.text))
    emb.word_mask[1] = False
    with pytest.raises(ValueError, match=r"text_mask leaves no real entry for item\(s\) \[1\]"):
        build_loss("filip")(emb)


def test_filip_builds_local_heads():
    from lightning_clip.module import ClipModule
    from test_module import TINY, batch

    m = ClipModule(loss="filip", **TINY)
    emb = m(batch())
    assert emb.regions is not None and emb.words.shape[:2] == emb.word_mask.shape
    assert torch.isfinite(m._compute_loss(emb).loss)


# -- option checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs,match", [
    ("cyclip", {"lambda_in": -1.0}, "lambda_in"), ("cyclip", {"lambda_cross": float("nan")}, "lambda_cross"),
    ("hn_nce", {"alpha": 0.0}, "alpha"), ("hn_nce", {"beta": float("inf")}, "beta"),
    ("cloob", {"hopfield_beta": 0.0}, "hopfield_beta"),
])
def test_bad_options_name_the_option(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, **kwargs)


# -- filip retrieval: token-wise, each direction by its own score -------------------------------------------
def _filip_world(n_images=6, caps=3, regions=4, words=5, dim=8, seed=0):
    from _loss_helpers import word_mask_for

    g = torch.Generator().manual_seed(seed)
    reg = torch.randn(n_images, regions, dim, generator=g).repeat_interleave(caps, 0)
    wrd = reg[:, :words - 1].repeat(1, 2, 1)[:, :words] + 1.5 * torch.randn(n_images * caps, words, dim, generator=g)
    mask = word_mask_for(n_images * caps, words, g)
    return reg, wrd, mask


def test_filip_similarity_is_token_wise_per_direction():
    from lightning_clip.losses.filip import pack_tokens

    module = build_loss("filip")
    reg, wrd, mask = _filip_world()
    x, y = F.normalize(reg, dim=-1), F.normalize(wrd, dim=-1)
    ones = torch.ones(reg.shape[:2], dtype=torch.bool)
    s_img, s_txt = token_similarity(x, ones, y, mask)
    emb = Embeddings(image=torch.randn(18, 8), text=torch.randn(18, 8), regions=reg, words=wrd, word_mask=mask)
    pi, pt = module.retrieval_inputs(emb)
    assert pi.shape == (18, 4, 9) and pt.shape == (18, 5, 9)
    assert torch.allclose(module.similarity(pi, pt, direction="i2t"), s_img, atol=1e-6)
    assert torch.allclose(module.similarity(pi, pt, direction="t2i"), s_txt, atol=1e-6)
    assert torch.allclose(module.similarity(pi, pt), (s_img + s_txt) / 2, atol=1e-6)
    # blocks: a tiny block size gives the same matrix
    import lightning_clip.losses.filip as filip_mod
    old, filip_mod._BLOCK = filip_mod._BLOCK, 1
    try:
        assert torch.allclose(module.similarity(pi, pt, direction="t2i"), s_txt, atol=1e-6)
    finally:
        filip_mod._BLOCK = old
    # pooled features (nothing token-wise kept): cosine
    assert torch.allclose(module.similarity(emb.image, emb.text), unit(emb)[0] @ unit(emb)[1].T, atol=1e-6)
    # padding: garbage in padded words changes no score
    assert torch.equal(pack_tokens(wrd.masked_fill(~mask[..., None], 1e3), mask), pt)


def test_filip_validation_ranks_by_token_wise_scores():
    from test_callbacks import FakeModule, fake_trainer, meta_of, world

    from lightning_clip.callbacks import RetrievalCallback
    from lightning_clip.eval.retrieval import rank_summary, retrieval_ranks

    items, image, text = world()
    reg, wrd, mask = _filip_world()
    module = FakeModule(build_loss("filip"))
    cb = RetrievalCallback()
    trainer = fake_trainer([cb])
    cb.on_validation_epoch_start(trainer, module)
    for start in range(0, 18, 5):
        s = slice(start, start + 5)
        emb = Embeddings(image=image[s], text=text[s], regions=reg[s], words=wrd[s], word_mask=mask[s])
        cb.on_validation_batch_end(trainer, module, {"emb": emb, "meta": meta_of(items[s])}, None, 0)
    cb.on_validation_epoch_end(trainer, module)
    # expected: deduplicated images (every third item) against the 18 captions, i2t by s^I, t2i by s^T
    s_img, s_txt = token_similarity(F.normalize(reg[::3], dim=-1), torch.ones(6, 4, dtype=torch.bool),
                                    F.normalize(wrd, dim=-1), mask)
    image_ids = torch.arange(6)
    text_image = torch.arange(18) // 3
    i2t = retrieval_ranks(s_img, image_ids[:, None] == text_image[None, :])
    t2i = retrieval_ranks(s_txt.T, text_image[:, None] == image_ids[None, :])
    res = cb.result(trainer, module)
    # the metric keeps captions in its own order (by caption id): map them back to the items
    from lightning_clip.callbacks.retrieval import caption_ids

    item_of = {int(t): k for k, t in enumerate(caption_ids(meta_of(items), 18))}
    order = torch.tensor([item_of[int(t)] for t in res.text_ids])
    assert torch.equal(res.i2t_ranks, i2t) and torch.equal(res.t2i_ranks, t2i[order])
    assert module.logged["val/t2i/R@1"] == pytest.approx(float(rank_summary(t2i, (1,))["R@1"]))
    # and the pooled cosine would have ranked differently (the test is not vacuous)
    cos = F.normalize(image[::3], dim=-1) @ F.normalize(text, dim=-1).T
    assert not torch.equal(retrieval_ranks(cos.T, text_image[:, None] == image_ids[None, :]), t2i)
