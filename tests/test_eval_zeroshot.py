"""Zero-shot classification with hand-made text encoders whose class embeddings are known."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_clip.eval.zeroshot import accuracy, class_embeddings, evaluate_zero_shot, zero_shot_scores

WORDS = ("a", "red", "blue", "thing")


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """One dimension per word of WORDS, counts (unnormalised on purpose)."""
    return torch.tensor([[t.split().count(w) for w in WORDS] for t in texts], dtype=torch.float32)


def lookup(table: dict[str, list[float]]):
    calls = []

    def fn(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])
    fn.calls = calls
    return fn


def test_class_embeddings_prompt_ensemble():
    emb = class_embeddings(bag_of_words, ["red", "blue"], ["a {}", "{} thing"])
    # red: normalise(mean((e_a + e_red) / sqrt2, (e_red + e_thing) / sqrt2)) = (e_a + 2 e_red + e_thing) / sqrt6
    expected = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 0.0, 2.0, 1.0]]) / math.sqrt(6)
    assert torch.allclose(emb, expected, atol=1e-6)
    # each template embedding is normalised before the mean: a template that repeats the name does not
    # outweigh the other
    emb = class_embeddings(bag_of_words, ["red"], ["a {}", "{0} {0} {0} {0}"])
    mean = (torch.tensor([1.0, 1.0, 0, 0]) / math.sqrt(2) + torch.tensor([0, 1.0, 0, 0])) / 2
    assert torch.allclose(emb[0], mean / mean.norm(), atol=1e-6)


def test_zero_shot_scores_are_cosines():
    image = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    classes = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    expected = torch.tensor([[0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    assert torch.allclose(zero_shot_scores(image, classes), expected, atol=1e-6)


def test_accuracy_top1_and_balanced():
    logits = torch.tensor([[0.9, 0.1, 0.0],   # 0, label 0: right
                           [0.8, 0.1, 0.1],   # 0, label 0: right
                           [0.7, 0.2, 0.1],   # 0, label 0: right
                           [0.1, 0.2, 0.7],   # 2, label 2: right
                           [0.6, 0.3, 0.1]])  # 0, label 2: wrong
    labels = torch.tensor([0, 0, 0, 2, 2])
    acc = accuracy(logits, labels)
    assert acc["top1"] == pytest.approx(4 / 5)
    assert acc["mean_per_class"] == pytest.approx((1.0 + 0.5) / 2)  # class 1 absent from labels: not counted


def test_accuracy_ties_go_to_lowest_index():
    acc = accuracy(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert acc == {"top1": 0.5, "mean_per_class": 0.5}


def test_evaluate_zero_shot_per_template_and_ensemble():
    # template 0 names the classes right, template 1 swaps them: the ensemble ties every class
    fn = lookup({"t0 A": [1.0, 0.0], "t0 B": [0.0, 1.0], "t1 A": [0.0, 1.0], "t1 B": [1.0, 0.0]})
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    out = evaluate_zero_shot(image, labels, fn, ["A", "B"], ["t0 {}", "t1 {}"])
    assert out == pytest.approx({"template/0/top1": 1.0, "template/0/mean_per_class": 1.0,
                                 "template/1/top1": 0.0, "template/1/mean_per_class": 0.0,
                                 "top1": 2 / 3, "mean_per_class": 0.5})
    assert fn.calls == [["t0 A", "t1 A"], ["t0 B", "t1 B"]]  # every text embedded once, one call per class


def test_evaluate_zero_shot_ensemble_beats_a_noisy_template():
    # one clean template and one that leans towards class B: the ensemble recovers the clean answer
    # where the noisy template alone fails
    fn = lookup({"c A": [1.0, 0.0], "c B": [0.0, 1.0], "n A": [1.0, 0.0], "n B": [1.0, 0.3]})
    image = torch.tensor([[1.0, 0.3], [0.05, 1.0]])
    out = evaluate_zero_shot(image, torch.tensor([0, 1]), fn, ["A", "B"], ["c {}", "n {}"])
    assert out["template/1/top1"] == 0.5 and out["template/0/top1"] == 1.0 and out["top1"] == 1.0


def test_bad_text_embed_fn_is_reported():
    with pytest.raises(ValueError, match="text_embed_fn"):
        class_embeddings(lambda texts: torch.zeros(1, 3), ["a"], ["{}", "x {}"])
