"""Classification tasks on the synthetic world, for zero-shot classification and linear probes.

Labels come from the scene ground truth (``KEY.json``'s ``scene``: ``{"objects": [{"shape", "color",
"size", "position"}, ...]}``), only where a label is unambiguous: an image with a red circle and a blue
square has no single colour. Prompts use only words of the world's vocabulary
(`lightning_clip.data.synthetic.vocabulary`), so the offline tokenizer knows every word, and follow the
captions' grammar: the same sentence frames (``_SENTENCES``), "an" before a vowel, objects joined as
"a thing, a thing and a thing".

Each task has ``classnames``, the phrases filled into its templates (``template.format(classnames[c])``,
as `lightning_clip.eval.zeroshot` calls them; CLIP_benchmark's templates spell the slot ``{c}``, so
pass it ``t.replace("{}", "{c}")``), and ``label_names``, plain names for reports. They differ where
the article belongs to the class ("an orange thing" but "a red thing", which no template can choose) and
for count, whose class phrases are the conjunctions themselves.

A caveat on ``count``: a caption may describe only some of the objects of its image, so "a thing" is
true of every image; only the conjunctions carry count information. Expect zero-shot count accuracy
near chance; the linear probe is the meaningful count measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lightning_clip.data.synthetic import _SENTENCES, COLORS, MAX_OBJECTS, POSITIONS, SHAPES

_COLORS = tuple(COLORS)


def _with_article(phrase: str) -> str:
    # The generator's rule (synthetic._article): "an" before a vowel letter.
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Task:
    name: str
    label_names: tuple[str, ...]  # readable: "orange", "orange star", "top left", "2"
    classnames: tuple[str, ...]   # filled into the templates: "an orange", "an orange star", "a thing and a thing"
    templates: tuple[str, ...]
    label_fn: Callable[[list[dict]], Optional[int]]  # the scene's objects -> class index or None


def _single(objects: list[dict], attr: str, values: Sequence[str]) -> Optional[int]:
    """The index of the value of ``attr`` shared by every object, None when they differ."""
    found = {o[attr] for o in objects}
    return values.index(found.pop()) if len(found) == 1 else None


def _color_shape(objects: list[dict]) -> Optional[int]:
    color, shape = _single(objects, "color", _COLORS), _single(objects, "shape", SHAPES)
    return None if color is None or shape is None else color * len(SHAPES) + shape


def _position(objects: list[dict]) -> Optional[int]:
    return POSITIONS.index(objects[0]["position"]) if len(objects) == 1 else None


def _count(objects: list[dict]) -> Optional[int]:
    return len(objects) - 1 if 1 <= len(objects) <= MAX_OBJECTS else None


def _conjunction(n: int) -> str:
    # As sample_caption joins several described objects.
    phrases = ["a thing"] * n
    return phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_COLOR_SHAPES = tuple(f"{c} {s}" for c in _COLORS for s in SHAPES)  # index color * 6 + shape
_COUNTS = tuple(range(1, MAX_OBJECTS + 1))

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("shape", SHAPES, SHAPES,
         ("a {}", "a picture of a {}", "there is a {}", "an image with a {}", "a {} on a grey background",
          "a photo showing a {}"),
         lambda objects: _single(objects, "shape", SHAPES)),
    # Colour is named with each of the captions' thing words ("a red thing", "an orange object").
    Task("color", _COLORS, tuple(_with_article(c) for c in _COLORS),
         ("{} thing", "{} object", "{} shape", "a picture of {} thing", "there is {} object",
          "an image with {} shape", "{} thing on a grey background"),
         lambda objects: _single(objects, "color", _COLORS)),
    Task("color_shape", _COLOR_SHAPES, tuple(_with_article(n) for n in _COLOR_SHAPES), _SENTENCES, _color_shape),
    Task("position", POSITIONS, POSITIONS,
         ("a thing in the {}", "a thing at the {}", "an object in the {}", "a shape at the {}",
          "a picture of a thing in the {}", "there is an object at the {}"),
         _position),
    Task("count", tuple(str(n) for n in _COUNTS), tuple(_conjunction(n) for n in _COUNTS), _SENTENCES, _count),
)}


def label(task: str, scene: dict) -> Optional[int]:
    """The class index of ``scene`` for ``task`` (a key of `TASKS`) where it is unambiguous, else None:
    shape / color / color_shape when every object shares it (color_shape index = color * 6 + shape, in
    the orders of ``COLORS`` and ``SHAPES``), position when there is exactly one object, count always
    (number of objects - 1)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choices: {sorted(TASKS)}")
    if scene is None:
        raise ValueError("world tasks need synthetic ground truth; got scene None (real data has none)")
    objects = scene["objects"]
    return TASKS[task].label_fn(objects) if objects else None


def labelled(task: str, scenes: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, labels)``: the positions in ``scenes`` with an unambiguous label for ``task``, and those
    labels (both int64), ready to select embedding rows for `evaluate_zero_shot` or `linear_probe`. A scene
    of None (an item without ground truth) has no label."""
    pairs = [(i, y) for i, y in ((i, label(task, s) if s is not None else None) for i, s in enumerate(scenes))
             if y is not None]
    idx, ys = zip(*pairs) if pairs else ((), ())
    return torch.tensor(idx, dtype=torch.long), torch.tensor(ys, dtype=torch.long)
