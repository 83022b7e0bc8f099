"""Loss options added for the false-negative and variance ablations: multi_positive's oracle targets
(``positives="oracle"``), SigLIP's prior-matched bias (``init_bias="prior"``) and probabilistic's
``gaussian_dims``. Each against infonce / the group version / a brute-force loop / float64 gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import random_embeddings
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.probabilistic import LN_STD_MAX, LN_STD_MIN
from lightning_clip.outputs import Embeddings


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def unit(emb):
    return F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)


def random_relevance(n, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, n, generator=g) < p  # not symmetric, diagonal not forced


# -- multi_positive, positives="oracle" ----------------------------------------------------------------
def brute_oracle(image, text, scale, relevance) -> float:
    i, t, rel = image.tolist(), text.tolist(), relevance.tolist()
    n = len(i)
    z = [[scale * sum(a * b for a, b in zip(i[r], t[c])) for c in range(n)] for r in range(n)]
    total = 0.0
    for r in range(n):  # image rows over captions: positives are the captions true of image r
        pos = [c for c in range(n) if rel[r][c] or c == r]
        total += lse(z[r]) - sum(z[r][c] for c in pos) / len(pos)
    for c in range(n):  # caption rows over images: positives are the images caption c is true of
        col = [z[r][c] for r in range(n)]
        pos = [r for r in range(n) if rel[r][c] or r == c]
        total += lse(col) - sum(col[r] for r in pos) / len(pos)
    return total / (2 * n)


def test_oracle_with_identity_relevance_equals_infonce():
    emb = random_embeddings(n=6, groups=False)
    image, text = unit(emb)
    eye = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(LF.multi_positive(image, text, 14.0, relevance=eye), LF.infonce(image, text, 14.0),
                          rtol=1e-14, atol=0)
    emb.relevance = eye
    oracle = build_loss("multi_positive", positives="oracle").double()
    assert torch.allclose(oracle(emb).loss, build_loss("infonce").double()(emb).loss, rtol=1e-12, atol=0)


def test_oracle_with_the_group_equality_matrix_equals_the_group_version():
    emb = random_embeddings(n=6)
    image, text = unit(emb)
    ig, tg = torch.tensor([0, 0, 1, 2, 2, 3]), torch.tensor([0, 0, 1, 7, 2, 3])  # item 3's ids disagree
    rel = ig[:, None] == tg[None, :]
    by_groups = LF.multi_positive(image, text, 14.0, ig, tg)
    assert torch.allclose(LF.multi_positive(image, text, 14.0, relevance=rel), by_groups, rtol=1e-14, atol=0)
    terms = build_loss("multi_positive", positives="oracle").double()(
        Embeddings(emb.image, emb.text, relevance=rel)).terms
    group_terms = build_loss("multi_positive").double()(
        Embeddings(emb.image, emb.text, image_groups=ig, text_groups=tg)).terms
    for k in ("i2t", "t2i", "positives"):
        assert torch.allclose(terms[k], group_terms[k], rtol=1e-12, atol=0), k


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (5, 2), (7, 3)])
def test_oracle_equals_brute_force(n, seed):
    emb = random_embeddings(n=n, seed=seed)
    rel = random_relevance(n, seed)
    emb.relevance = rel
    module = build_loss("multi_positive", positives="oracle").double()
    expected = brute_oracle(*unit(emb), module.logit_scale.item(), rel)
    assert module(emb).loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert module(emb).terms["positives"].item() == pytest.approx(
        (rel | torch.eye(n, dtype=torch.bool)).sum(1).double().mean().item())
    # the relevance is not symmetric: the two directions read its rows and its columns
    if n == 7:
        assert module(emb).loss.item() != pytest.approx(brute_oracle(*unit(emb), module.logit_scale.item(), rel.T))


def test_oracle_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in ((5, 3), (5, 3), ()))
    rel = random_relevance(5, 4, p=0.4)
    assert torch.autograd.gradcheck(lambda i, t, ls: LF.multi_positive(i, t, ls.exp(), relevance=rel), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_oracle_needs_and_errors_name_the_option():
    oracle = build_loss("multi_positive", positives="oracle")
    assert set(oracle.needs) == {"relevance"} and set(build_loss("multi_positive").needs) == {"groups"}
    emb = random_embeddings(n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"positives='oracle' \(option model\.loss_args\.positives\) needs the "
                                         r"batch's relevance matrix"):
        oracle(emb)
    emb.relevance = torch.ones(8, 4, dtype=torch.bool)  # what GradCache's concatenation would hand over
    with pytest.raises(ValueError, match=r"relevance .* bool \[N, N\] = \[4, 4\].*negatives_from"):
        oracle(emb)
    with pytest.raises(ValueError, match=r"bool \[N, N\]"):
        LF.multi_positive(emb.image, emb.text, 1.0, relevance=torch.ones(4, 4))
    with pytest.raises(ValueError, match="not both"):
        LF.multi_positive(emb.image, emb.text, 1.0, torch.arange(4), torch.arange(4),
                          relevance=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"unknown positives 'labels' \(option model\.loss_args\.positives\)"):
        build_loss("multi_positive", positives="labels")


# -- siglip, init_bias="prior" --------------------------------------------------------------------------
def test_siglip_prior_bias_is_set_once_at_the_first_training_forward():
    loss = build_loss("siglip", init_bias="prior").double()
    emb = random_embeddings(n=6)
    loss.eval()
    loss(emb)  # validation (or a sanity check) does not set it
    assert not bool(loss.bias_initialized) and loss.scalars()["bias"] == pytest.approx(-10.0)
    loss.train()
    out = loss(emb)
    assert bool(loss.bias_initialized) and loss.scalars()["bias"] == pytest.approx(-math.log(6), rel=1e-12)
    image, text = unit(emb)
    # (the module casts its scale and bias to float32)
    assert out.loss.item() == pytest.approx(LF.siglip(image, text, 10.0, -math.log(6)).item(), rel=1e-6)
    # then it is a learned parameter like any other: a later batch of another size does not reset it
    with torch.no_grad():
        loss.bias.add_(0.5)
    loss(random_embeddings(n=3))
    assert loss.scalars()["bias"] == pytest.approx(0.5 - math.log(6), rel=1e-12)


def test_siglip_prior_bias_survives_a_resume():
    trained = build_loss("siglip", init_bias="prior").double()
    trained(random_embeddings(n=6))
    with torch.no_grad():
        trained.bias.fill_(-1.25)
    resumed = build_loss("siglip", init_bias="prior").double()
    resumed.load_state_dict(trained.state_dict())
    resumed(random_embeddings(n=4))
    assert resumed.scalars()["bias"] == -1.25
    # a number keeps the old state dict (no buffer) and the old behaviour
    fixed = build_loss("siglip", init_bias=-3.0)
    fixed(random_embeddings(n=4, dtype=torch.float32))
    assert "bias_initialized" not in fixed.state_dict() and fixed.scalars()["bias"] == -3.0


def test_siglip_bias_batch_carries_a_bias_to_another_batch_by_the_prior():
    # a bias tuned at batch 64 (-4.0) starts a batch-16 run at -4.0 - ln(16/64) = -4.0 + ln 4
    loss = build_loss("siglip", init_bias=-4.0, bias_batch=64).double()
    assert loss.scalars()["bias"] == -4.0 and not bool(loss.bias_initialized)
    loss.train()
    emb = random_embeddings(n=16)
    out = loss(emb)
    assert loss.scalars()["bias"] == pytest.approx(-4.0 + math.log(4), rel=1e-12)
    image, text = unit(emb)
    assert out.loss.item() == pytest.approx(LF.siglip(image, text, 10.0, -4.0 + math.log(4)).item(), rel=1e-6)
    # at the reference batch it is the bias as given; once set, a resume keeps the learned value
    same = build_loss("siglip", init_bias=-4.0, bias_batch=8).double()
    same(random_embeddings(n=8))
    assert same.scalars()["bias"] == pytest.approx(-4.0, abs=1e-12)
    with torch.no_grad():
        same.bias.fill_(-2.5)
    resumed = build_loss("siglip", init_bias=-4.0, bias_batch=8).double()
    resumed.load_state_dict(same.state_dict())
    resumed(random_embeddings(n=32))
    assert resumed.scalars()["bias"] == -2.5
    # "prior" is the same rule at (0, 1)
    prior = build_loss("siglip", init_bias="prior").double()
    prior(random_embeddings(n=16))
    assert prior.scalars()["bias"] == pytest.approx(-math.log(16), rel=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"init_bias": "prior", "bias_batch": 64}, "already follows the batch, not both"),
    ({"init_bias": -4.0, "bias_batch": 0}, r"bias_batch \(option model\.loss_args\.bias_batch\)"),
    ({"init_bias": -4.0, "bias_batch": 6.5}, r"bias_batch \(option model\.loss_args\.bias_batch\)"),
])
def test_siglip_bad_bias_batch_names_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build_loss("siglip", **options)


@pytest.mark.parametrize("bad", ["pior", float("nan"), None, True])
def test_siglip_bad_init_bias_names_the_option(bad):
    with pytest.raises(ValueError, match=r"siglip: init_bias \(option model\.loss_args\.init_bias\) must be a finite "
                                         r"number or 'prior', got "):
        build_loss("siglip", init_bias=bad)


# -- every family's option checks: one wording (family, option, rule, value) ------------------------------
BAD_OPTIONS = [  # (family, option, bad value, the rule the message states)
    ("cloob", "hopfield_beta", 0.0, "must be a finite number > 0"),
    ("cloob", "hopfield_beta", True, "must be a finite number > 0"),
    ("cyclip", "lambda_in", -1.0, "must be a finite number >= 0"),
    ("cyclip", "lambda_cross", float("nan"), "must be a finite number >= 0"),
    ("hn_nce", "alpha", 0, "must be a finite number > 0"),
    ("hn_nce", "beta", float("inf"), "must be a finite number"),
    ("hn_nce", "beta", "1", "must be a finite number"),
    ("pcmepp", "vib_beta", -0.5, "must be a finite number >= 0"),
    ("probabilistic", "mode", "laplace", "choose one of \\('proposal', 'gaussian'\\)"),
    ("soft_targets", "mode", "exact", "choose one of"),
    ("multi_positive", "positives", "labels", "choose one of \\('groups', 'oracle'\\)"),
    ("nce", "num_negatives", -1, "must be an integer >= 0"),
    ("nce", "num_negatives", 2.5, "must be an integer >= 0"),
    ("nce", "num_negatives", "many", "must be an integer >= 0"),
    ("siglip", "init_bias", float("-inf"), "must be a finite number or 'prior'"),
    ("infonce", "label_smoothing", 1.0, "must be a finite number >= 0 and < 1"),
    ("infonce", "label_smoothing", -0.1, "must be a finite number >= 0 and < 1"),
]


@pytest.mark.parametrize("family,option,value,rule", BAD_OPTIONS,
                         ids=[f"{f}-{o}-{v!r}" for f, o, v, _ in BAD_OPTIONS])
def test_bad_option_message_names_family_option_rule_and_value(family, option, value, rule):
    import re

    with pytest.raises(ValueError) as info:
        build_loss(family, **{option: value})
    message = str(info.value)
    assert message.startswith(f"{family}: "), message
    assert f"(option model.loss_args.{option})" in message, message
    assert re.search(rule, message), message
    assert repr(value) in message, message


@pytest.mark.parametrize("family,option,value", [
    ("cloob", "hopfield_beta", 1e-3), ("cyclip", "lambda_in", 0), ("cyclip", "lambda_cross", 0.0),
    ("hn_nce", "alpha", 1e-6), ("hn_nce", "beta", -2), ("pcmepp", "vib_beta", 0), ("nce", "num_negatives", 0),
    ("nce", "num_negatives", 4.0), ("siglip", "init_bias", 0), ("siglip", "init_bias", "prior"),
    ("infonce", "label_smoothing", 0.0), ("infonce", "label_smoothing", 0.999),
    ("probabilistic", "mode", "gaussian"), ("soft_targets", "mode", "fixed"), ("multi_positive", "positives", "oracle"),
])
def test_boundary_option_values_are_accepted(family, option, value):
    build_loss(family, **{option: value})


# -- probabilistic, gaussian_dims ----------------------------------------------------------------------
def brute_gaussian(image, text, a, b, k) -> float:
    i, t = F.normalize(image, dim=-1).tolist(), F.normalize(text, dim=-1).tolist()
    a = [min(max(v, LN_STD_MIN), LN_STD_MAX) for v in a.tolist()]
    b = [min(max(v, LN_STD_MIN), LN_STD_MAX) for v in b.tolist()]
    n = len(i)
    d = [[sum((x - y) ** 2 for x, y in zip(i[r], t[c])) for c in range(n)] for r in range(n)]
    total = 0.0
    for r in range(n):  # image rows over captions, with the captions' log-stds
        z = [-k * b[c] - d[r][c] / (2 * math.exp(2 * b[c])) for c in range(n)]
        total += lse(z) - z[r]
    for c in range(n):  # caption rows over images, with the images' log-stds
        z = [-k * a[r] - d[r][c] / (2 * math.exp(2 * a[r])) for r in range(n)]
        total += lse(z) - z[c]
    return total / (2 * n)


def test_gaussian_dims_none_is_the_current_behaviour_exactly():
    emb = random_embeddings(n=6, dim=5)
    emb.image, emb.text = unit(emb)
    args = (emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    current = LF.probabilistic(*args, mode="gaussian")
    assert torch.equal(LF.probabilistic(*args, mode="gaussian", gaussian_dims=None), current)
    assert torch.equal(LF.probabilistic(*args, mode="gaussian", gaussian_dims=5), current)  # D = 5
    assert current.item() == pytest.approx(brute_gaussian(*args, k=5), rel=1e-10)
    module = build_loss("probabilistic", mode="gaussian", normalize=False).double()
    assert torch.equal(module(emb).loss, current)


@pytest.mark.parametrize("k", [1, 0.0, 2.5])
def test_gaussian_dims_equals_brute_force(k):
    emb = random_embeddings(n=5, dim=4, seed=3)
    emb.text_ln_std[0] = 7.0  # beyond the clamp
    module = build_loss("probabilistic", mode="gaussian", gaussian_dims=k).double()
    expected = brute_gaussian(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, k)
    assert module(emb).loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    # None is D = 4 in the same loop, and differs from k
    default = build_loss("probabilistic", mode="gaussian").double()(emb).loss.item()
    assert default == pytest.approx(brute_gaussian(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std, 4),
                                    rel=1e-10)
    assert default != pytest.approx(expected)
    # retrieval ranks by the same logits
    sim = module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    i, t = unit(emb)
    d = torch.cdist(i, t) ** 2
    tl, il = emb.text_ln_std.clamp(LN_STD_MIN, LN_STD_MAX), emb.image_ln_std.clamp(LN_STD_MIN, LN_STD_MAX)
    i2t = -k * tl[None] - d / (2 * (2 * tl[None]).exp())
    t2i = -k * il[:, None] - d / (2 * (2 * il[:, None]).exp())
    assert torch.allclose(sim, ((i2t + t2i) / 2).float(), rtol=1e-5, atol=1e-5)


def test_gaussian_dims_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    inputs = (r(4, 3), r(4, 3), (r(4) / 4).detach().requires_grad_(), (r(4) / 4).detach().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda i, t, a, b: LF.probabilistic(i, t, a, b, mode="gaussian", gaussian_dims=1.0), inputs,
        eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kw,message", [
    ({"mode": "proposal", "gaussian_dims": 1}, r"gaussian_dims=1 \(option model\.loss_args\.gaussian_dims\) "
                                               r"applies only to mode='gaussian'"),
    ({"mode": "gaussian", "gaussian_dims": -1}, r"gaussian_dims \(option model\.loss_args\.gaussian_dims\) must"),
    ({"mode": "gaussian", "gaussian_dims": "D"}, r"must be a finite number"),
    ({"mode": "gaussian", "gaussian_dims": float("inf")}, r"must be a finite number"),
])
def test_gaussian_dims_errors_name_the_option(kw, message):
    with pytest.raises(ValueError, match=message):
        build_loss("probabilistic", **kw)


@pytest.mark.parametrize("family", ["infonce", "siglip", "dcl"])
@pytest.mark.parametrize("scale, learn", [(1e6, False), (0.5, False), (1e6, True)])
def test_scale_outside_the_clamp_range_is_an_error_not_a_silent_clamp(family, scale, learn):
    from lightning_clip.losses import build_loss

    import re

    with pytest.raises(ValueError, match=rf"model.loss_args.init_scale={re.escape(f'{scale:g}')} is outside the scale range "
                                         rf"\[1, 100\].*learn_scale={learn}"):
        build_loss(family, init_scale=scale, learn_scale=learn)
    # the ends of the range are honoured as given
    for ok in (1.0, 100.0):
        loss = build_loss(family, init_scale=ok, learn_scale=learn)
        loss.clamp_()
        assert loss.scalars()["scale"] == pytest.approx(ok)
