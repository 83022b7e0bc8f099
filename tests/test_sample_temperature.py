"""sample_temperature (issue 28, seed 000's control): InfoNCE with a per-item temperature from the variance
heads. Closed forms against InfoNCE, a plain-Python loop, float64 gradcheck, the query side's ranking
invariance, the candidate side's retrieval score, clear errors, two gloo ranks against one process, and the
variance callback's rho for the family."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _loss_helpers import finite_loss_and_grads, random_embeddings
from lightning_clip.losses import build_loss
from lightning_clip.losses import functional as LF
from lightning_clip.losses.probabilistic import LN_STD_MAX, LN_STD_MIN
from lightning_clip.losses.sample_temperature import sample_temperature, sample_temperature_terms
from lightning_clip.outputs import Embeddings

SIDES = ("query", "candidate")


def unit(emb):
    return F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)


# -- closed forms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("n", [1, 2, 7])
def test_zero_log_std_is_infonce_exactly(side, n):
    emb = random_embeddings(n=n, seed=n)
    image, text = unit(emb)
    zeros = torch.zeros(n, dtype=torch.float64)
    got = sample_temperature(image, text, zeros, zeros, 14.0, side)
    assert torch.equal(got, LF.infonce(image, text, 14.0))
    module = build_loss("sample_temperature", side=side).double()
    emb.image_ln_std, emb.text_ln_std = zeros, zeros
    assert torch.equal(module(emb).loss, build_loss("infonce").double()(emb).loss)


@pytest.mark.parametrize("side", SIDES)
def test_a_shared_log_std_is_infonce_at_scale_over_sigma_squared(side):
    """Every item at ln sigma = c: every logit is scaled by exp(-2c), i.e. InfoNCE at s exp(-2c)."""
    emb = random_embeddings(n=6, seed=3)
    image, text = unit(emb)
    c = torch.full((6,), 0.4, dtype=torch.float64)
    expected = LF.infonce(image, text, 14.0 * math.exp(-0.8))
    assert torch.allclose(sample_temperature(image, text, c, c, 14.0, side), expected, rtol=1e-13)


def test_query_temperatures_are_per_row_and_candidate_ones_per_column():
    """One caption's sigma: on the query side it moves only the t2i term (its own row), on the candidate
    side only the i2t term (its column in every image's row)."""
    emb = random_embeddings(n=5, seed=4)
    image, text = unit(emb)
    zeros = torch.zeros(5, dtype=torch.float64)
    t_std = zeros.clone()
    t_std[2] = 0.7
    base = sample_temperature_terms(image, text, zeros, zeros, 10.0, "query")
    query = sample_temperature_terms(image, text, zeros, t_std, 10.0, "query")
    cand = sample_temperature_terms(image, text, zeros, t_std, 10.0, "candidate")
    assert torch.equal(query["i2t"], base["i2t"]) and not torch.equal(query["t2i"], base["t2i"])
    assert torch.equal(cand["t2i"], base["t2i"]) and not torch.equal(cand["i2t"], base["i2t"])


# -- brute force ------------------------------------------------------------------------------------------
def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def brute(image, text, image_ln_std, text_ln_std, s, side):
    img, txt = F.normalize(image, dim=-1).tolist(), F.normalize(text, dim=-1).tolist()
    n = len(img)
    w = lambda ln: math.exp(-2 * min(max(ln, LN_STD_MIN), LN_STD_MAX))  # noqa: E731
    wi, wt = [w(v) for v in image_ln_std.tolist()], [w(v) for v in text_ln_std.tolist()]
    cos = [[sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # image i's row over captions j
        row = [s * (wi[i] if side == "query" else wt[j]) * cos[i][j] for j in range(n)]
        total += _lse(row) - row[i]
    for j in range(n):  # caption j's row over images i
        row = [s * (wt[j] if side == "query" else wi[i]) * cos[i][j] for i in range(n)]
        total += _lse(row) - row[j]
    return total / (2 * n)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_equals_a_python_loop(side, n):
    emb = random_embeddings(n=n, dim=4, seed=10 + n)
    image_ln_std = emb.image_ln_std * 3
    text_ln_std = emb.text_ln_std * 3
    if n == 5:  # beyond the clamp on both ends
        image_ln_std[0], text_ln_std[1] = -9.0, 7.0
    module = build_loss("sample_temperature", side=side).double()
    s = module.logit_scale.item()
    got = module(Embeddings(emb.image, emb.text, image_ln_std=image_ln_std, text_ln_std=text_ln_std)).loss
    expected = brute(emb.image, emb.text, image_ln_std, text_ln_std, s, side)
    assert abs(got.item() - expected) <= 1e-10 * max(1.0, abs(expected)), (got.item(), expected)


# -- gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
def test_gradcheck_float64_features_log_std_and_scale(side):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    inputs = (r(4, 3), r(4, 3), (0.5 * r(4)).detach().requires_grad_(), (0.5 * r(4)).detach().requires_grad_(),
              r(()))
    fn = lambda i, t, a, b, ls: sample_temperature(F.normalize(i, dim=-1), F.normalize(t, dim=-1), a, b,  # noqa: E731
                                                   2 * ls.exp(), side)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_finite_at_the_clamp_edges_and_under_bf16_autocast():
    for side in SIDES:
        module = build_loss("sample_temperature", side=side)
        with torch.no_grad():
            module.log_scale.fill_(math.log(100.0))
        emb = random_embeddings(n=8, dtype=torch.float32)
        emb.image_ln_std = torch.tensor([LN_STD_MIN, LN_STD_MAX, -50.0, 50.0] * 2)
        emb.text_ln_std = emb.image_ln_std.flip(0)
        finite_loss_and_grads(module, emb)
        finite_loss_and_grads(module, emb, torch.bfloat16)


# -- retrieval ----------------------------------------------------------------------------------------------
def test_query_side_ranks_by_cosine_and_its_training_logits_agree():
    from lightning_clip.losses.base import cosine_similarity

    emb = random_embeddings(n=6, seed=5)
    emb.image_ln_std, emb.text_ln_std = emb.image_ln_std * 4, emb.text_ln_std * 4
    module = build_loss("sample_temperature").double()
    sim = module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    assert torch.equal(sim, cosine_similarity(emb.image, emb.text))
    # the logits the loss trains with order every query's candidates as the retrieval score does
    image, text = unit(emb)
    cos = image @ text.T
    s = module.logit_scale
    i2t = s * torch.exp(-2 * emb.image_ln_std)[:, None] * cos
    t2i = s * torch.exp(-2 * emb.text_ln_std)[:, None] * cos.T
    assert torch.equal(i2t.argsort(dim=1), sim.argsort(dim=1))
    assert torch.equal(t2i.argsort(dim=1), sim.T.argsort(dim=1))
    # ... and those are the logits whose cross-entropy is the loss
    labels = torch.arange(6)
    expected = (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
    assert torch.allclose(module(emb).loss, expected, rtol=1e-12)


def test_candidate_side_ranks_by_the_mean_of_the_two_directional_logits():
    emb = random_embeddings(n=5, seed=6)
    emb.image_ln_std, emb.text_ln_std = emb.image_ln_std * 4, emb.text_ln_std * 4
    module = build_loss("sample_temperature", side="candidate")
    sim = module.similarity(emb.image, emb.text, emb.image_ln_std, emb.text_ln_std)
    img, txt = unit(emb)
    s = module.logit_scale.item()
    for i in range(5):
        for j in range(5):
            cos = float(img[i] @ txt[j])
            i2t = s * math.exp(-2 * emb.text_ln_std[j].item()) * cos
            t2i = s * math.exp(-2 * emb.image_ln_std[i].item()) * cos
            assert sim[i, j].item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # the column factors do reorder: not the cosine order
    assert not torch.equal(sim.argsort(1), (img @ txt.T).float().argsort(1))


# -- errors and module contract ------------------------------------------------------------------------------
def test_bad_shapes_and_options_raise_clear_errors():
    emb = random_embeddings(n=4)
    image, text = unit(emb)
    with pytest.raises(ValueError, match=r"sample_temperature: text_ln_std must have shape \[N\] = \[4\], got \(3,\)"):
        sample_temperature(image, text, torch.zeros(4), torch.zeros(3), 10.0)
    with pytest.raises(ValueError, match=r"sample_temperature: image_ln_std must have shape \[N\] = \[4\]"):
        sample_temperature(image, text, torch.zeros(4, 1), torch.zeros(4), 10.0)
    with pytest.raises(ValueError, match="image and text features must have the same shape"):
        sample_temperature(image, text[:3], torch.zeros(4), torch.zeros(4), 10.0)
    with pytest.raises(ValueError, match="needs image_ln_std and text_ln_std"):
        build_loss("sample_temperature")(Embeddings(emb.image, emb.text))
    with pytest.raises(ValueError, match=r"unknown side 'row' \(option model\.loss_args\.side\); choose one of"):
        build_loss("sample_temperature", side="row")
    with pytest.raises(ValueError, match=r"option model\.loss_args\.side"):
        sample_temperature(image, text, torch.zeros(4), torch.zeros(4), 10.0, side="column")
    with pytest.raises(ValueError, match="init_scale"):
        build_loss("sample_temperature", init_scale=1000.0)


def test_module_terms_needs_scale_and_clamp():
    module = build_loss("sample_temperature").double()
    out = module(random_embeddings(n=5))
    assert set(out.terms) == {"i2t", "t2i", "image_ln_std", "text_ln_std"}
    assert module.needs == {"image_ln_std", "text_ln_std"}
    assert module.scalars()["scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        module.log_scale.fill_(10.0)
    module.clamp_()
    assert module.scalars()["scale"] == pytest.approx(100.0)


def test_the_variance_callback_logs_rho_for_the_family():
    from test_callbacks import FakeModule, run_validation, world

    from lightning_clip.callbacks.retrieval import RetrievalCallback
    from lightning_clip.callbacks.variance import VarianceCallback

    items, image, text = world(n_images=10, caps=2)
    spec = torch.tensor([it["specificity"] for it in items]).float()
    ln_std = (torch.zeros(len(items)), -spec + 0.01 * torch.arange(len(items)))
    module = FakeModule(build_loss("sample_temperature"))
    assert VarianceCallback.applies_to(module)
    run_validation([VarianceCallback(), RetrievalCallback()], module, items, image, text, ln_std=ln_std)
    assert module.logged["variance/text/spearman_specificity"] < -0.9
    assert "variance/text/R@1_decile_1" in module.logged


# Two gloo ranks against one process, both sides: tests/test_loss_distributed.py (CASES in _loss_helpers).


# -- the variance table's columns ---------------------------------------------------------------------------
def test_variance_table_shows_calibration_deciles_and_meru_rho(tmp_path):
    """The decile R@1 (final_metrics.json), AUSE (eval.json) and meru's origin-distance rho appear as
    columns, right after the variance rho, for the cells that logged them; a column nobody logged does not."""
    import json

    from lightning_clip import report
    from lightning_clip.eval.records import record

    logged = {"sample-temperature": {"variance/text/spearman_specificity": -0.5,
                                     "variance/text/R@1_decile_1": 0.8, "variance/text/R@1_decile_10": 0.05},
              "meru": {"hyperbolic/text/spearman_specificity": 0.25}, "infonce": {}}
    for cell, extra in logged.items():
        for seed in (0, 1):
            run = tmp_path / "variance" / cell / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "final_metrics.json").write_text(json.dumps({"val/t2i/R@1": 0.3, "step": 10, **extra}))
            (run / "DONE").write_text("{}")
            if cell == "sample-temperature":
                cal = {"text_ause": 0.12 + 0.01 * seed, "image_ause": 0.26}
                (run / "eval.json").write_text(json.dumps([record("w/val", "variance_calibration", cal)]))
    manifest = dict(ablation="variance", baseline="infonce", seeds=[0, 1],
                    cells=[dict(name=c, description=c) for c in logged])
    (tmp_path / "variance" / "ablation.json").write_text(json.dumps(manifest))
    md = report.write_report("variance", runs_dir=tmp_path, results_dir=tmp_path / "results",
                             plots=False)["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    labels = ["ρ(text var, specificity)", "ρ(text origin dist, specificity)", "t2i R@1, lowest text var decile",
              "t2i R@1, highest text var decile", "AUSE (text)", "AUSE (image)"]
    positions = [header.index(label) for label in labels]
    assert positions == sorted(positions), header
    assert "ρ(image var, objects)" not in header  # nobody logged it
    row = next(line for line in md.splitlines() if line.startswith("| `sample-temperature`"))
    assert "80.0" in row and "5.0" in row and "0.125 ± " in row and "0.260" in row
    assert "0.250" in next(line for line in md.splitlines() if line.startswith("| `meru`"))
