"""World tasks: prompts in the world's vocabulary and grammar, labels on hand-built scenes."""
from __future__ import annotations

import random
import re

import pytest
import torch

from lightning_clip.data import synthetic
from lightning_clip.eval.world_tasks import TASKS, label, labelled
from lightning_clip.eval.zeroshot import evaluate_zero_shot


def obj(shape="circle", color="red", size="small", position="center"):
    return {"shape": shape, "color": color, "size": size, "position": position}


def scene(*objects):
    return {"objects": list(objects)}


def words(text: str) -> list[str]:
    return text.replace(",", " , ").split()  # as synthetic.vocabulary() splits


def test_task_sizes():
    sizes = {name: len(t.label_names) for name, t in TASKS.items()}
    assert sizes == {"shape": 6, "color": 8, "color_shape": 48, "position": 9, "count": 3}
    for t in TASKS.values():
        assert len(t.classnames) == len(t.label_names) and len(t.templates) >= 3


def test_every_prompt_word_is_in_the_vocabulary():
    vocab = set(synthetic.vocabulary())
    for t in TASKS.values():
        for template in t.templates:
            for name in t.classnames:
                text = template.format(name)
                assert set(words(text)) <= vocab, (t.name, text)


def test_articles_follow_the_captions():
    color = TASKS["color"]
    assert color.templates[0].format(color.classnames[color.label_names.index("orange")]) == "an orange thing"
    assert color.templates[0].format(color.classnames[color.label_names.index("red")]) == "a red thing"
    cs = TASKS["color_shape"]
    assert cs.classnames[cs.label_names.index("orange star")] == "an orange star"
    assert TASKS["count"].classnames == ("a thing", "a thing and a thing", "a thing, a thing and a thing")


def test_color_shape_prompts_are_captions_the_world_writes():
    # every one-object, colour + shape caption of an orange star is one of the class's prompts
    cs = TASKS["color_shape"]
    prompts = {t.format(cs.classnames[cs.label_names.index("orange star")]) for t in cs.templates}
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        c = synthetic.sample_caption(scene(obj("star", "orange")), rng)
        if c["level"] == 2:
            seen.add(c["text"])
    assert seen == prompts


def test_count_prompts_join_like_the_captions():
    # "A, B and C": the shape of a caption describing all three objects of a scene
    three = re.compile(r"^an? [^,]+, an? [^,]+ and an? [^,]+$")
    s = scene(obj(position="top left"), obj(position="center"), obj(position="bottom right"))
    rng = random.Random(1)
    texts = {synthetic.sample_caption(s, rng)["text"] for _ in range(400)}
    assert any(three.match(t) for t in texts)
    assert three.match(TASKS["count"].classnames[2])
    assert not any(three.match(t) for t in TASKS["count"].classnames[:2])


def test_labels_on_hand_built_scenes():
    one = scene(obj("star", "orange", position="top right"))
    assert label("shape", one) == synthetic.SHAPES.index("star") == 5
    assert label("color", one) == tuple(synthetic.COLORS).index("orange") == 1
    assert label("color_shape", one) == 1 * 6 + 5
    assert TASKS["color_shape"].label_names[label("color_shape", one)] == "orange star"
    assert label("position", one) == 2
    assert label("count", one) == 0

    same = scene(obj("square", "blue", position="top left"), obj("square", "blue", "large", "center"))
    assert label("shape", same) == 1
    assert label("color", same) == 5
    assert TASKS["color_shape"].label_names[label("color_shape", same)] == "blue square"
    assert label("count", same) == 1


def test_ambiguity_returns_none():
    mixed_color = scene(obj("circle", "red", position="top left"), obj("circle", "blue", position="center"))
    assert label("shape", mixed_color) == 0
    assert label("color", mixed_color) is None
    assert label("color_shape", mixed_color) is None
    assert label("position", mixed_color) is None  # two objects: no single position
    mixed_shape = scene(obj("circle"), obj("cross", position="top left"), obj("star", position="bottom left"))
    assert label("shape", mixed_shape) is None and label("color", mixed_shape) == 0
    assert label("color_shape", mixed_shape) is None
    assert label("count", mixed_shape) == 2


def test_labelled_selects_unambiguous_rows():
    scenes = [scene(obj("circle", "red")), scene(obj(color="red"), obj(color="blue", position="top left")),
              scene(obj("star", "white"))]
    idx, ys = labelled("color", scenes)
    assert idx.tolist() == [0, 2] and ys.tolist() == [0, 7]
    idx, ys = labelled("position", scenes[1:2])
    assert idx.numel() == 0 and ys.numel() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown task"):
        label("size", scene(obj()))
    with pytest.raises(ValueError, match="ground truth"):
        label("shape", None)


def test_tasks_plug_into_zero_shot():
    # a bag-of-words text encoder and images embedded as the words of their label: every task with
    # attribute words classifies perfectly, so classnames and templates fit evaluate_zero_shot's call
    vocab = synthetic.vocabulary()

    def bag(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[words(t).count(w) for w in vocab] for t in texts], dtype=torch.float32)

    for name in ("shape", "color", "color_shape", "position"):
        task = TASKS[name]
        images = bag(task.label_names)
        out = evaluate_zero_shot(images, torch.arange(len(task.label_names)), bag, task.classnames, task.templates)
        assert out["top1"] == 1.0, name
        assert all(out[f"template/{i}/top1"] == 1.0 for i in range(len(task.templates))), name
