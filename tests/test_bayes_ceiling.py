"""The generator's likelihood P(caption | scene) (`data.likelihood`) against the real generator, and the Bayes
ceiling built on it (`eval.ceilings`): against the oracle ceiling, on the default world's validation split,
against every committed trained run, and as the retrieval callback logs it."""
from __future__ import annotations

import collections
import inspect
import itertools
import csv
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_clip.callbacks import retrieval as retrieval_callback
from lightning_clip.callbacks import RetrievalCallback
from lightning_clip.data import likelihood
from lightning_clip.data.likelihood import caption_probability, likelihood_matrix, parse_caption
from lightning_clip.data.oracle import relevance_matrix
from lightning_clip.data.synthetic import generate, make_sample, sample_caption, sample_scene
from lightning_clip.eval.ceilings import bayes_ceiling, bayes_ceiling_of, caption_likelihoods
from lightning_clip.eval.retrieval import oracle_ceiling
from lightning_clip.losses.infonce import InfoNCELoss

ROOT = Path(__file__).resolve().parents[1]


def obj(shape, color, size="small", position="center"):
    return {"shape": shape, "color": color, "size": size, "position": position}


# Two red circles make "a red thing" / "a red circle" reachable two ways, and the blue square a conjunction
# partner on either side of them in the scene's order.
SCENE3 = {"objects": [obj("circle", "red", "small", "top left"), obj("circle", "red", "large", "center"),
                      obj("square", "blue", "small", "bottom right")]}
SCENE1 = {"objects": [obj("star", "orange", "large", "middle left")]}


# -- the likelihood against the generator ------------------------------------------------------------------
def chi_square(scene, n, seed, probability=caption_probability):
    """Pearson's statistic of ``n`` captions drawn by the real generator against ``probability``, texts
    with under 5 expected draws pooled into one bin; and its degrees of freedom."""
    rng = random.Random(seed)
    seen = collections.Counter(sample_caption(scene, rng)["text"] for _ in range(n))
    probs = {t: float(probability(t, scene)) for t in seen}
    assert all(p > 0 for p in probs.values()), [t for t, p in probs.items() if p == 0][:3]
    big = [t for t in seen if probs[t] * n >= 5]
    pooled_obs = n - sum(seen[t] for t in big)
    pooled_exp = n * (1 - sum(probs[t] for t in big))
    stat = sum((seen[t] - n * probs[t]) ** 2 / (n * probs[t]) for t in big)
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
    return stat, len(big)


def critical(df):  # far in the upper tail of chi2(df): about 6 sd above the mean
    return df + 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("scene,seed", [(SCENE1, 0), (SCENE3, 1)])
def test_likelihood_matches_the_generators_frequencies(scene, seed):
    stat, df = chi_square(scene, 6000, seed)
    assert stat < critical(df), (stat, df)


def test_the_monte_carlo_check_fails_on_a_wrong_enumeration(monkeypatch):
    # describing 1..N objects uniformly, or forgetting that two red circles both produce "a red circle"
    stat, df = chi_square(SCENE3, 6000, 1, probability=lambda t, s: _without_multiplicity(t, s))
    assert stat > critical(df)
    monkeypatch.setattr(likelihood, "count_law", lambda n_obj, n: Fraction(1, n_obj) / math.comb(n_obj, n)
                        if 1 <= n <= n_obj else Fraction(0))
    stat, df = chi_square(SCENE3, 6000, 1)
    assert stat > critical(df)


def _without_multiplicity(text, scene):
    objects = scene["objects"]
    total = Fraction(0)
    for p in parse_caption(text):
        n = len(p.objects)
        hit = any(all(all(objects[i][a] == v for a, v in d) for i, d in zip(chosen, p.objects))
                  for chosen in itertools.combinations(range(len(objects)), n))
        total += p.weight * likelihood.count_law(len(objects), n) * hit
    return total


def test_a_one_object_image_is_the_likelier_source_of_a_vague_caption():
    three = {"objects": [obj("square", "blue", position="top left"), obj("circle", "red"),
                         obj("star", "green", position="bottom right")]}  # in grid order, as generated
    one = {"objects": [obj("circle", "red")]}
    # one object: always described alone (1/4 level, 1/2 colour, 1/3 "thing", 1/6 template);
    # three: described alone half the time, and then the red one a third of it
    assert caption_probability("a red thing", one) == Fraction(1, 4 * 2 * 3 * 6)
    assert caption_probability("a red thing", three) == Fraction(1, 4 * 2 * 3 * 6) / 6
    assert caption_probability("a red thing", {"objects": [obj("circle", "blue")]}) == 0
    # conjunctions follow the scene's object order (grid cells, row by row)
    assert caption_probability("a blue square and a red circle", three) > 0
    assert caption_probability("a red circle and a blue square", three) == 0
    assert likelihood.caption_likelihood({"text": "a red thing"}, one) == pytest.approx(1 / 144)


def test_parse_recovers_the_generators_structure_and_rejects_other_text():
    rng = random.Random(5)
    for _ in range(500):
        scene = sample_scene(rng)
        cap = sample_caption(scene, rng)
        parses = parse_caption(cap["text"])
        assert any(p.level == cap["level"] and p.constraints == cap["constraints"] for p in parses), cap
    for text in ("a red thing #1", "a red circle and", "a picture of", "", "a red circle, a blue square",
                 "a small red thing", "two red circles"):
        assert parse_caption(text) == ()
    with pytest.raises(ValueError, match="not a text the synthetic generator renders"):
        likelihood_matrix(["a red thing #1"], [SCENE1])


def test_the_matrix_is_the_exact_probability_and_lives_inside_the_oracle():
    rng = random.Random(7)
    scenes = [sample_scene(rng) for _ in range(40)] + [SCENE3, SCENE1]
    caps = [sample_caption(s, rng) for s in scenes for _ in range(2)]
    texts = [c["text"] for c in caps] + ["a red thing", "a blue square and a red circle"]
    num, den = likelihood_matrix(texts, scenes)
    for t, text in enumerate(texts):
        for i, scene in enumerate(scenes):
            assert Fraction(int(num[t, i]), int(den[t])) == caption_probability(text, scene)
    own = np.repeat(np.arange(len(scenes)), 2)
    assert (num[np.arange(len(caps)), own] > 0).all()          # a caption is possible from its own image
    rel = relevance_matrix([c["constraints"] for c in caps], scenes).numpy()
    assert not ((num[:len(caps)] > 0) & ~rel).any()             # and only where the oracle accepts


# -- the ceiling ---------------------------------------------------------------------------------------------
def random_world(seed, n_img=12, caps=3):
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(100, 100 + n_img)
    text_image_ids = image_ids.repeat_interleave(caps)
    rel = torch.rand(n_img * caps, n_img, generator=g) < 0.3
    return rel, image_ids, text_image_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_flat_likelihood_gives_the_oracle_ceiling(seed):
    rel, image_ids, text_image_ids = random_world(seed)
    accepted = rel | (text_image_ids[:, None] == image_ids[None, :])
    want = oracle_ceiling(rel, image_ids, text_image_ids)
    # any per-caption scale: the posterior normalises it away, and integers keep the ties exact
    scale = torch.randint(1, 50, (len(text_image_ids), 1), generator=torch.Generator().manual_seed(seed))
    for lik in (accepted.long(), accepted.long() * scale):
        got = bayes_ceiling(lik, image_ids, text_image_ids)
        assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in want.items()})


def test_bayes_ceiling_by_hand():
    image_ids, text_image_ids = torch.tensor([7, 8, 9]), torch.tensor([7, 7, 8, 9])
    lik = np.array([[3, 1, 0],    # own image the likeliest: 1
                    [1, 1, 1],    # a three-way tie: 1/3
                    [2, 1, 0],    # another image likelier: 0
                    [0, 0, 0]])   # nothing produces it: 0
    c = bayes_ceiling(lik, image_ids, text_image_ids)
    assert float(c["t2i/R@1"]) == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)
    # posteriors per caption row: [3/4, 1/4, 0], [1/3]*3, [2/3, 1/3, 0], [0]*3; image 7's best is caption 0
    # (own), image 8's caption 1 (1/3, image 7's) ties caption 2 (1/3, own): 1/2; image 9's caption 1: 0
    assert float(c["i2t/R@1"]) == pytest.approx((1 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="likelihood must be"):
        bayes_ceiling(lik.T, image_ids, text_image_ids)
    assert bayes_ceiling_of(None, [SCENE1], image_ids[:1], image_ids[:1]) is None
    assert caption_likelihoods(["a red thing #1"], [SCENE1]) is None


# -- the default world -----------------------------------------------------------------------------------------
def _ceilings(split: str, num: int):
    """The default world's ``split`` as the evaluation sees it (one item per caption), made with `make data`'s
    generator settings (base.yaml's data.generate) without writing shards: (oracle, Bayes) ceilings."""
    gen = yaml.safe_load((ROOT / "experiments" / "base.yaml").read_text())["data"]["generate"]
    metas = [json.loads(make_sample(i, split, seed=gen["seed"], image_size=gen["image_size"])["json"])
             for i in range(num)]
    image_ids = torch.tensor([m["image_id"] for m in metas])
    texts = [c["text"] for m in metas for c in m["captions"]]
    text_image_ids = torch.tensor([m["image_id"] for m in metas for _ in m["captions"]])
    rel = relevance_matrix([c["constraints"] for m in metas for c in m["captions"]], [m["scene"] for m in metas])
    oracle = {k: float(v) for k, v in oracle_ceiling(rel, image_ids, text_image_ids).items()}
    bayes = {k: float(v) for k, v in
             bayes_ceiling_of(texts, [m["scene"] for m in metas], image_ids, text_image_ids).items()}
    return oracle, bayes


@pytest.fixture(scope="module")
def default_val():
    gen = yaml.safe_load((ROOT / "experiments" / "base.yaml").read_text())["data"]["generate"]
    return _ceilings("val", gen["num_val"])


@pytest.fixture(scope="module")
def default_test():  # base.yaml leaves the test split's size at synthetic.generate's default
    return _ceilings("test", inspect.signature(generate).parameters["num_test"].default)


def test_bayes_ceiling_on_the_default_world_is_above_the_oracle_ceiling(default_val):
    oracle, bayes = default_val
    assert oracle == pytest.approx({"t2i/R@1": 0.34407, "i2t/R@1": 0.82522}, abs=1e-5)  # README's numbers
    assert bayes == pytest.approx({"t2i/R@1": 0.43974, "i2t/R@1": 0.83989}, abs=1e-5)
    assert bayes["t2i/R@1"] >= oracle["t2i/R@1"] and bayes["i2t/R@1"] >= oracle["i2t/R@1"]


def test_no_committed_run_beats_the_bayes_ceiling(default_val):
    oracle, bayes = default_val
    checked = 0
    for path in sorted((ROOT / "results").glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                # the runs validated on the default world: their logged oracle ceiling is its
                if not row.get("val/ceiling/t2i/R@1 mean") or \
                        abs(float(row["val/ceiling/t2i/R@1 mean"]) - oracle["t2i/R@1"]) > 1e-6:
                    continue
                for d in ("t2i", "i2t"):
                    low = float(row[f"val/{d}/R@1 ci_low"] or row[f"val/{d}/R@1 mean"])
                    assert low <= bayes[f"{d}/R@1"], (path.name, row["cell"], d, low, bayes)
                    checked += 1
    assert checked >= 2 * 8  # at least the losses ablation's cells


def test_no_committed_test_split_run_beats_the_bayes_ceiling(default_test):
    """The test-split tables (a confirm stage's default and tuned columns, a design's cells) report percent
    means with their 95% intervals; each interval's lower end must not pass the test split's ceiling."""
    oracle, bayes = default_test
    assert oracle == pytest.approx({"t2i/R@1": 0.36981, "i2t/R@1": 0.87893}, abs=1e-5)  # the tables' numbers
    assert bayes == pytest.approx({"t2i/R@1": 0.46320, "i2t/R@1": 0.88576}, abs=1e-5)
    assert bayes["t2i/R@1"] >= oracle["t2i/R@1"] and bayes["i2t/R@1"] >= oracle["i2t/R@1"]
    checked = 0
    for path in sorted((ROOT / "results").glob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for prefix in ("", "default ", "tuned "):
            for row in rows:
                for d in ("t2i", "i2t"):
                    low = row.get(f"{prefix}{d} R@1 low") or row.get(f"{prefix}{d} R@1 mean")
                    if low:
                        assert float(low) <= 100 * bayes[f"{d}/R@1"], (path.name, row["cell"], prefix, d, low)
                        checked += 1
    assert checked >= 2 * 4  # at least the damsm design's cells


# -- the callback ---------------------------------------------------------------------------------------------
def test_retrieval_callback_logs_the_bayes_ceiling_once_per_validation_set(monkeypatch):
    from tests.test_callbacks import FakeModule, run_validation, world

    items, image, text = world(n_images=8, caps=3, seed=3)
    for k, it in enumerate(items):  # the texts as the generator wrote them (world() tags them apart), and
        it["caption"] = it["caption"].rsplit(" #", 1)[0]  # one key per caption, as the loader's "key#k"
        it["key"] = f"{it['key']}#{k}"
    calls = []
    real = retrieval_callback.bayes_ceiling_of
    monkeypatch.setattr(retrieval_callback, "bayes_ceiling_of", lambda *a: calls.append(1) or real(*a))
    cb, module = RetrievalCallback(), FakeModule(InfoNCELoss())
    run_validation([cb], module, items, image, text)
    run_validation([cb], module, items, image, text + 0.1)
    assert len(calls) == 1  # the data did not change between the two validations
    ids = torch.tensor([it["image_id"] for it in items])
    want = bayes_ceiling_of([it["caption"] for it in items], [it["scene"] for it in items[::3]], ids[::3], ids)
    assert module.logged["val/bayes/t2i/R@1"] == pytest.approx(float(want["t2i/R@1"]))
    assert module.logged["val/bayes/i2t/R@1"] == pytest.approx(float(want["i2t/R@1"]))
    assert cb.last_metrics["val/bayes/t2i/R@1"] == module.logged["val/bayes/t2i/R@1"]


# -- the report -----------------------------------------------------------------------------------------------
def test_every_table_states_the_bayes_ceiling_and_old_results_have_none():
    from lightning_clip import report

    metrics = {cell: {seed: {"val/t2i/R@1": 0.3 + 0.01 * seed, "val/ceiling/t2i/R@1": 0.344,
                             "val/ceiling/i2t/R@1": 0.825, "val/bayes/t2i/R@1": 0.4397, "val/bayes/i2t/R@1": 0.8399}
                      for seed in (0, 1)} for cell in ("infonce", "siglip")}
    md = report.format_markdown(report.summarize(metrics, "infonce"), "x")
    assert "Oracle ceiling (expected R@1 of a perfect scorer with random tie-breaking): t2i 34.4%, i2t 82.5%." in md
    assert ("Bayes ceiling (expected R@1 of ranking by the caption generator's own likelihood P(caption | image)): "
            "t2i 44.0%, i2t 84.0%.") in md
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    assert "Bayes" not in header and "ceiling" not in header
    # a committed table from before the Bayes ceiling: the oracle's line only
    md = report.format_markdown(report.read_csv(ROOT / "results" / "archive" / "2026-12-03-short-budget" / "batch_steps.csv"),
                                "batch_steps")
    assert "Oracle ceiling" in md and "Bayes" not in md
