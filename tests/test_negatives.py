"""Negatives apart from the loss form (issue 28 item 3): nce's sampler (seed 'run', replacement, validation
draws, checkpoint state) and sampled_infonce (InfoNCE over k sampled negatives). Brute-force loops over
floats, closed forms (k = N - 1 without replacement is infonce / siglip exactly), float64 gradcheck."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import dot, lse, random_embeddings, softplus
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.nce import nce, run_seed, sample_negatives
from lightning_clip.losses.sampled_softmax import sampled_infonce
from lightning_clip.outputs import Embeddings

FAMILIES = ("nce", "sampled_infonce")


@pytest.fixture
def run_seed_env(monkeypatch):
    """Set (or, with None, clear) PL_GLOBAL_SEED as Lightning's seed_everything would."""
    def set_seed(value):
        if value is None:
            monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        else:
            monkeypatch.setenv("PL_GLOBAL_SEED", str(value))
    set_seed(None)
    return set_seed


def unit_pair(n, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1))




def first_draw(family, n, **kwargs):
    """The indices a freshly built module draws at its first training forward."""
    module = build_loss(family, **kwargs)
    return sample_negatives(n, module.num_negatives, module.sampler.generator(True), module.replacement)


# -- the sampler --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(2, 1), (5, 2), (7, 6), (64, 63), (64, 5)])
def test_without_replacement_draws_k_distinct_others(n, k):
    idx = sample_negatives(n, k, torch.Generator().manual_seed(n + k), replacement=False)
    assert idx.shape == (2, n, k) and idx.dtype == torch.long
    for d in range(2):
        for i in range(n):
            row = idx[d, i].tolist()
            assert len(set(row)) == k, f"repeated negative in row {i}: {row}"
            assert i not in row and all(0 <= j < n for j in row)
            if k == n - 1:  # every other item exactly once
                assert sorted(row) == [j for j in range(n) if j != i]


def test_without_replacement_is_uniform_over_the_others():
    # n = 5, k = 2: each of the 4 others is drawn with probability 1/2 per row; 2,000 draws x 2 directions
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(2000):
        counts.update(sample_negatives(5, 2, g, replacement=False)[:, 0].flatten().tolist())
    assert counts[0] == 0 and set(counts) == {1, 2, 3, 4}
    for j in range(1, 5):  # expected 2,000; binomial sd ~32, so 150 is > 4.5 sd
        assert abs(counts[j] - 2000) < 150, counts


def test_with_replacement_is_the_historical_draw():
    # seed 0 must give today's indices: r ~ U{0..n-2}, shifted past the anchor
    n, k = 6, 4
    r = torch.randint(0, n - 1, (2, n, k), generator=torch.Generator().manual_seed(0))
    want = r + (r >= torch.arange(n)[None, :, None])
    assert torch.equal(sample_negatives(n, k, torch.Generator().manual_seed(0)), want)
    assert torch.equal(sample_negatives(n, k, torch.Generator().manual_seed(0), replacement=True), want)


def test_too_few_items_without_replacement_names_the_option_and_the_batch():
    with pytest.raises(ValueError, match=r"nce: num_negatives \(option model\.loss_args\.num_negatives\) = 63 .*"
                                         r"at least 64 items, got a batch of 52"):
        sample_negatives(52, 63, replacement=False)
    emb = random_embeddings(n=4)
    with pytest.raises(ValueError, match=r"sampled_infonce: num_negatives .* = 4 .*got a batch of 4"):
        build_loss("sampled_infonce", num_negatives=4)(emb)
    with pytest.raises(ValueError, match=r"nce: num_negatives .* = 4 .*got a batch of 4"):
        build_loss("nce", num_negatives=4, replacement=False)(emb)
    # validation's short batch uses all N - 1 others instead
    assert sample_negatives(4, 63, replacement=False, clamp_to_batch=True).shape == (2, 4, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_short_batch_equals_k_all_others(family):
    emb = random_embeddings(n=4)
    bias = {"init_bias": -1.0} if family == "nce" else {}  # nce's default bias is -ln k: keep it equal
    module = build_loss(family, num_negatives=63, replacement=False, **bias).double().eval()
    every = build_loss(family, num_negatives=3, replacement=False, **bias).double().eval()
    assert module(emb).loss.item() == pytest.approx(every(emb).loss.item(), rel=1e-12)


# -- seed: 'run', int, None ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_seed_run_follows_the_run_seed(family, run_seed_env):
    run_seed_env(1)
    a = first_draw(family, 16, num_negatives=5)
    assert torch.equal(a, first_draw(family, 16, num_negatives=5)), "the same run seed drew different negatives"
    run_seed_env(2)
    assert not torch.equal(a, first_draw(family, 16, num_negatives=5)), "two run seeds drew the same negatives"
    run_seed_env(None)  # no seed_everything: 0
    assert run_seed() == 0
    assert torch.equal(first_draw(family, 16, num_negatives=5),
                       first_draw(family, 16, num_negatives=5, seed=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_run_is_read_at_the_first_training_forward(family, run_seed_env):
    module = build_loss(family, num_negatives=3).double()   # built before seed_everything ran
    run_seed_env(7)
    emb = random_embeddings(n=6)
    fixed = build_loss(family, num_negatives=3, seed=7).double()
    assert module(emb).loss.item() == fixed(emb).loss.item() and module.sampler.resolved_seed == 7
    run_seed_env(8)  # already seeded: a later change of the variable does not re-seed mid-run
    assert module(emb).loss.item() == fixed(emb).loss.item() and module.sampler.resolved_seed == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_int_seed_is_fixed_and_none_uses_the_global_rng(family, run_seed_env):
    run_seed_env(3)
    a = first_draw(family, 12, num_negatives=4, seed=11)
    run_seed_env(4)
    assert torch.equal(a, first_draw(family, 12, num_negatives=4, seed=11))
    module = build_loss(family, num_negatives=4, seed=None)
    assert module.sampler.generator(True) is None
    torch.manual_seed(5)
    b = sample_negatives(12, 4, module.sampler.generator(True), module.replacement)
    torch.manual_seed(5)
    assert torch.equal(b, sample_negatives(12, 4, None, module.replacement))


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_does_not_advance_the_training_stream(family):
    emb = random_embeddings(n=6)
    plain, validated = (build_loss(family, num_negatives=2, seed=3).double() for _ in range(2))
    first = [plain(emb).loss.item(), plain(emb).loss.item()]
    validated(emb)
    validated.eval()
    v1, v2 = validated(emb).loss.item(), validated(emb).loss.item()
    assert v1 == v2, "validation drew different negatives for the same batch"
    validated.train()
    assert validated(emb).loss.item() == first[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_keeps_the_sampler_state(family, run_seed_env):
    run_seed_env(5)
    emb = random_embeddings(n=6)
    module = build_loss(family, num_negatives=2).double()
    module(emb)
    state = module.state_dict()
    assert state["sampler._extra_state"]["seed"] == 5
    continued = module(emb).loss.item()
    run_seed_env(6)  # a resumed run gets the same seed anyway; the saved state must win regardless
    resumed = build_loss(family, num_negatives=2).double()
    resumed.load_state_dict(state)
    assert resumed(emb).loss.item() == continued
    # a checkpoint from before the sampler kept its state loads (strictly) and re-seeds at the first forward
    old = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    fresh = build_loss(family, num_negatives=2).double()
    fresh.load_state_dict(old)
    assert fresh.sampler.resolved_seed is None
    fresh(emb)
    assert fresh.sampler.resolved_seed == 6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option,value,message", [
    ("seed", "once", r"seed \(option model\.loss_args\.seed\) must be 'run' .* got 'once'"),
    ("seed", -1, r"seed \(option model\.loss_args\.seed\) must be 'run'"),
    ("seed", 1.5, r"seed \(option model\.loss_args\.seed\) must be 'run'"),
    ("replacement", "no", r"replacement \(option model\.loss_args\.replacement\) must be true or false, got 'no'"),
    ("num_negatives", -2, r"num_negatives \(option model\.loss_args\.num_negatives\) must be an integer >= 0"),
])
def test_bad_options_name_the_option(family, option, value, message):
    with pytest.raises(ValueError, match=f"{family}: {message}"):
        build_loss(family, **{option: value})


def test_bad_run_seed_variable_is_named(run_seed_env):
    run_seed_env("abc")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED"):
        build_loss("nce")(random_embeddings(n=3))


# -- sampled_infonce: closed forms, brute force, gradcheck ---------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_sampled_infonce_with_every_other_item_is_infonce(n):
    image, text = unit_pair(n, seed=n)
    scale = torch.tensor(7.3, dtype=torch.float64, requires_grad=True)
    got = sampled_infonce(image, text, scale, num_negatives=n - 1, generator=torch.Generator().manual_seed(n))
    want = LF.infonce(image, text, scale)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    assert torch.autograd.grad(got, scale)[0].item() == pytest.approx(torch.autograd.grad(want, scale)[0].item(),
                                                                       rel=1e-10, abs=1e-12)


def test_sampled_infonce_module_with_k_n_minus_1_is_the_infonce_module():
    emb = random_embeddings(n=8, dim=5, seed=3)
    got = build_loss("sampled_infonce", num_negatives=7).double()(emb)
    want = build_loss("infonce").double()(emb)
    for key in ("i2t", "t2i"):
        assert got.terms[key].item() == pytest.approx(want.terms[key].item(), rel=1e-12)


def brute_sampled_infonce(image, text, s, idx):
    img, txt = image.tolist(), text.tolist()
    n = len(img)
    total = 0.0
    for d, (a, c) in enumerate(((img, txt), (txt, img))):
        for i in range(n):
            logits = [s * dot(a[i], c[i])] + [s * dot(a[i], c[j]) for j in idx[d][i]]
            total += lse(logits) - logits[0]
    return total / (2 * n)


@pytest.mark.parametrize("n,k,replacement", [(1, 0, False), (2, 1, False), (6, 3, False), (6, 3, True),
                                             (5, 9, True), (7, 0, True)])
def test_sampled_infonce_equals_brute_force(n, k, replacement):
    emb = random_embeddings(n=n, dim=4, seed=n + k)
    module = build_loss("sampled_infonce", num_negatives=k, replacement=replacement, seed=4).double()
    got = module(emb).loss.item()
    idx = sample_negatives(n, k, torch.Generator().manual_seed(4), replacement).tolist()
    want = brute_sampled_infonce(F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1),
                                 module.logit_scale.item(), idx)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    if k == 0:
        assert got == 0.0  # the positive alone: probability 1


@pytest.mark.parametrize("replacement", [False, True])
def test_sampled_infonce_gradcheck_float64(replacement):
    g = torch.Generator().manual_seed(0)
    image, text = (torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    log_scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    fn = lambda i, t, ls: sampled_infonce(i, t, ls.exp(), num_negatives=3, replacement=replacement,  # noqa: E731
                                          generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(fn, (image, text, log_scale), eps=1e-6, atol=1e-7, rtol=1e-6)


# -- nce without replacement --------------------------------------------------------------------------------
def brute_nce(image, text, s, b, idx):
    img, txt = image.tolist(), text.tolist()
    n = len(img)
    total = 0.0
    for d, (a, c) in enumerate(((img, txt), (txt, img))):
        for i in range(n):
            total += softplus(-(s * dot(a[i], c[i]) + b)) + sum(softplus(s * dot(a[i], c[j]) + b) for j in idx[d][i])
    return total / (2 * n)


@pytest.mark.parametrize("n,k", [(5, 4), (6, 2), (9, 8)])
def test_nce_without_replacement_equals_brute_force(n, k):
    emb = random_embeddings(n=n, dim=4, seed=n)
    module = build_loss("nce", num_negatives=k, replacement=False, init_bias=-1.75, seed=9).double()
    idx = sample_negatives(n, k, torch.Generator().manual_seed(9), replacement=False).tolist()
    want = brute_nce(F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1), module.logit_scale.item(), -1.75,
                     idx)
    assert module(emb).loss.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_nce_with_every_other_item_is_siglip(n):
    # each direction sums every off-diagonal pair once: (1/N)[sum softplus(-z_ii) + sum_{i!=j} softplus(z_ij)]
    image, text = unit_pair(n, seed=10 + n)
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-math.log(n - 1), dtype=torch.float64)
    got = nce(image, text, scale, num_negatives=n - 1, logit_bias=bias, replacement=False,
              generator=torch.Generator().manual_seed(1))
    z = (scale * image @ text.T + bias).tolist()
    pairs = sum(softplus(-z[i][j] if i == j else z[i][j]) for i in range(n) for j in range(n)) / n
    assert got.item() == pytest.approx(pairs, rel=1e-12)
    assert got.item() == pytest.approx(LF.siglip(image, text, scale, bias).item(), rel=1e-12)


def test_nce_without_replacement_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
                   for shape in ((5, 3), (5, 3), (), ()))
    fn = lambda i, t, ls, b: nce(i, t, ls.exp(), num_negatives=3, logit_bias=b, replacement=False,  # noqa: E731
                                 generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_nce_defaults_keep_todays_configuration():
    module = build_loss("nce")
    assert (module.num_negatives, module.replacement, module.sampler.seed) == (5, True, "run")
    assert module.scalars()["bias"] == pytest.approx(-math.log(5))
    assert module.scalars()["scale"] == pytest.approx(10.0)
    other = build_loss("sampled_infonce")
    assert (other.num_negatives, other.replacement, other.sampler.seed, other.bias) == (5, False, "run", None)
    assert other.scalars()["scale"] == pytest.approx(1 / 0.07)


def test_sampled_infonce_rejects_bad_input_like_every_family():
    with pytest.raises(ValueError, match="NaN"):
        sampled_infonce(torch.randn(3, 4), torch.full((3, 4), float("nan")), 2.0, num_negatives=2)
    with pytest.raises(ValueError, match="same shape"):
        sampled_infonce(torch.randn(3, 4), torch.randn(2, 4), 2.0, num_negatives=1)
    with pytest.raises(ValueError, match="empty batch"):
        build_loss("sampled_infonce", num_negatives=0)(Embeddings(torch.randn(0, 4), torch.randn(0, 4)))
