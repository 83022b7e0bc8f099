"""The caption generator's own likelihood: P(caption text | scene) under `synthetic.sample_caption`.

The relevance oracle says *whether* a caption is true of an image; the generator also says *how likely* the
image was to produce it. "a red thing" is three times likelier from a scene with one red object than from
one with three objects (one of them red), so ranking images by P(caption | image) beats random tie-breaking
among the accepted ones: this is the Bayes-optimal scorer of the world (`eval.ceilings`).

The generator's choices, every one uniform (`sample_caption`, `_describe`):

1. the level, 1..4;
2. how many objects are described: one with probability 1/2 when the scene has several (else always one),
   otherwise 2..N uniformly; then which ones, a uniform subset, described in the scene's object order;
3. per described object, the attributes of the level (level 1: colour *or* shape), and the phrasing:
   a size synonym, a thing word when the shape is not named, "in the" / "at the" before a position;
4. the sentence template.

A text is parsed once into every generator path that renders exactly it (`parse_caption`): template,
level, and per phrase the described attribute values and the probability of its phrasing. The phrase
renderings come from running the real `_describe` under a scripted random source that walks every choice,
so wording changes in the generator cannot drift away from this model. Given a scene, a parse contributes
P(template) P(level) P(n | N) / C(N, n) x (phrasing probabilities) x (the number of increasing index
tuples of the scene's objects that match the descriptions in order). Probabilities are exact fractions;
`likelihood_matrix` returns them as integers over a per-caption denominator, so equal likelihoods compare
equal (the Bayes ceiling breaks exact ties at random).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

import numpy as np

from lightning_clip.data.oracle import object_bits
from lightning_clip.data.synthetic import (ATTRIBUTES, LEVEL_ATTRIBUTES, MAX_OBJECTS, _SENTENCES, _describe)

# `sample_caption`'s joins: ", ".join(phrases[:-1]) + " and " + phrases[-1]
_AND, _COMMA = " and ", ", "


@dataclass(frozen=True)
class Parse:
    """One way the generator renders a text: its level, the described objects (attribute -> value, in the
    scene's object order) and P(template) P(level) x the phrasing probabilities (scene-independent)."""

    level: int
    objects: tuple[tuple[tuple[str, str], ...], ...]
    weight: Fraction

    @property
    def constraints(self) -> dict:
        return {"objects": [dict(o) for o in self.objects]}


class _Script:
    """A stand-in for `random.Random` that answers ``choice`` from a fixed path of indices (0 past its
    end) and records how many options each call had: enough to walk `_describe`'s choice tree."""

    def __init__(self, path: tuple[int, ...]):
        self.path, self.widths = path, []

    def choice(self, seq):
        k = self.path[len(self.widths)] if len(self.widths) < len(self.path) else 0
        self.widths.append(len(seq))
        return seq[k]


def _renderings(obj: dict, attrs: tuple[str, ...]) -> dict[str, Fraction]:
    """Every text `_describe(obj, attrs, rng)` can return, with its probability."""
    out: dict[str, Fraction] = {}
    stack: list[tuple[int, ...]] = [()]
    while stack:
        path = stack.pop()
        script = _Script(path)
        text = _describe(obj, attrs, script)
        if len(script.widths) > len(path):  # a choice this path left open: branch on it
            stack.extend(path + (k,) for k in range(script.widths[len(path)]))
            continue
        p = Fraction(1)
        for w in script.widths:
            p /= w
        out[text] = out.get(text, Fraction(0)) + p
    return out


@functools.lru_cache(maxsize=1)
def _phrase_table() -> dict[str, list[tuple[tuple[str, ...], tuple[tuple[str, str], ...], Fraction]]]:
    """phrase text -> [(attributes, described values, P(this text | attributes, values))]."""
    table: dict[str, list] = {}
    attr_sets = sorted({a for options in LEVEL_ATTRIBUTES.values() for a in options})
    for attrs in attr_sets:
        for values in itertools.product(*(ATTRIBUTES[a] for a in attrs)):
            described = tuple(zip(attrs, values))
            obj = {a: vs[0] for a, vs in ATTRIBUTES.items()} | dict(described)  # unread attributes: any value
            for text, p in _renderings(obj, attrs).items():
                table.setdefault(text, []).append((attrs, described, p))
    return table


def _split_phrases(np_: str) -> list[list[str]]:
    """The ways a noun phrase splits into the generator's conjunction of 1..MAX_OBJECTS phrases."""
    table = _phrase_table()
    out = [[np_]] if np_ in table else []
    start = 0
    while (pos := np_.find(_AND, start)) >= 0:
        start = pos + 1
        head, last = np_[:pos], np_[pos + len(_AND):]
        parts = head.split(_COMMA) + [last]
        if 2 <= len(parts) <= MAX_OBJECTS and all(p in table for p in parts):
            out.append(parts)
    return out


@functools.lru_cache(maxsize=65536)
def parse_caption(text: str) -> tuple[Parse, ...]:
    """Every generator path that renders exactly ``text`` (empty when the generator cannot produce it)."""
    table = _phrase_table()
    p_template = Fraction(1, len(_SENTENCES))
    p_level = Fraction(1, len(LEVEL_ATTRIBUTES))
    parses = []
    for template in _SENTENCES:
        prefix, suffix = template.split("{}")
        if len(text) <= len(prefix) + len(suffix) or not (text.startswith(prefix) and text.endswith(suffix)):
            continue
        for phrases in _split_phrases(text[len(prefix):len(text) - len(suffix)]):
            for level, options in LEVEL_ATTRIBUTES.items():
                p_attrs = Fraction(1, len(options))
                per_phrase = [[(d, p_attrs * p) for attrs, d, p in table[ph] if attrs in options] for ph in phrases]
                for combo in itertools.product(*per_phrase):
                    weight = p_template * p_level
                    for _, p in combo:
                        weight *= p
                    parses.append(Parse(level, tuple(d for d, _ in combo), weight))
    return tuple(parses)


def count_law(num_objects: int, n: int) -> Fraction:
    """P(the caption describes this particular set of ``n`` of the scene's ``num_objects`` objects):
    `sample_caption` describes one object with probability 1/2 when there are several, else 2..N
    uniformly, and the set uniformly among those of its size."""
    if not 1 <= n <= num_objects:
        return Fraction(0)
    if num_objects == 1:
        p_n = Fraction(1)
    else:
        p_n = Fraction(1, 2) if n == 1 else Fraction(1, 2 * (num_objects - 1))
    return p_n / math.comb(num_objects, n)


def _text(caption: Union[str, dict]) -> str:
    return caption if isinstance(caption, str) else caption["text"]


def caption_probability(caption: Union[str, dict], scene: dict) -> Fraction:
    """Exact P(caption text | scene); ``caption`` is the text or a caption record (its ``text``)."""
    objects = scene["objects"]
    total = Fraction(0)
    for parse in parse_caption(_text(caption)):
        n = len(parse.objects)
        law = count_law(len(objects), n)
        if not law:
            continue
        hits = sum(all(all(objects[i].get(a) == v for a, v in d) for i, d in zip(chosen, parse.objects))
                   for chosen in itertools.combinations(range(len(objects)), n))
        total += parse.weight * law * hits
    return total


def caption_likelihood(caption: Union[str, dict], scene: dict) -> float:
    """P(caption text | scene) under the generator, as a float (`caption_probability` is exact)."""
    return float(caption_probability(caption, scene))


@functools.lru_cache(maxsize=65536)
def _coefficients(text: str) -> Optional[tuple[int, tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]]:
    """(denominator K, per parse (description bits, K x weight x count_law(N, n) for N = 0..MAX_OBJECTS)),
    all integers, or None when the generator cannot render ``text``."""
    parses = parse_caption(text)
    if not parses:
        return None
    coef = [[p.weight * count_law(m, len(p.objects)) for m in range(MAX_OBJECTS + 1)] for p in parses]
    k = math.lcm(*(c.denominator for row in coef for c in row))
    return k, tuple((tuple(object_bits(p.constraints, "parse")), tuple(int(c * k) for c in row))
                    for p, row in zip(parses, coef))


def likelihood_matrix(texts: Sequence[str], scenes: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(num int64 [Nt, Ni], den int64 [Nt])`` with P(texts[t] | scenes[i]) = num[t, i] / den[t] exactly.

    Vectorised over images: each scene's objects are the oracle's attribute bitsets, a description is met
    by an object when ``object & description == description``, and a parse counts the increasing tuples of
    object slots that meet its descriptions in order (padding slots meet none). Raises ValueError naming
    the first text the generator cannot render (data from another generator)."""
    rows = [object_bits(s, "scene", i) for i, s in enumerate(scenes)]
    if any(len(r) > MAX_OBJECTS for r in rows):
        raise ValueError(f"a scene has more than MAX_OBJECTS={MAX_OBJECTS} objects")
    objs = np.zeros((len(rows), MAX_OBJECTS), dtype=np.int64)
    for i, r in enumerate(rows):
        objs[i, :len(r)] = r
    n_obj = np.array([len(r) for r in rows], dtype=np.int64)
    num = np.zeros((len(texts), len(rows)), dtype=np.int64)
    den = np.ones(len(texts), dtype=np.int64)
    done: dict[str, int] = {}
    for t, text in enumerate(texts):
        if text in done:  # identical captions have identical rows
            num[t], den[t] = num[done[text]], den[done[text]]
            continue
        coefs = _coefficients(text)
        if coefs is None:
            raise ValueError(f"caption {t} ({text!r}) is not a text the synthetic generator renders")
        den[t] = coefs[0]
        for bits, by_count in coefs[1]:
            d = np.array(bits, dtype=np.int64)
            k = d.size
            combos = np.array(list(itertools.combinations(range(MAX_OBJECTS), k)))      # [C, k] increasing
            met = (objs[:, None, :] & d[None, :, None]) == d[None, :, None]              # [Ni, k, slots]
            count = met[:, np.arange(k)[None, :], combos].all(-1).sum(-1)                # [Ni]
            num[t] += np.array(by_count, dtype=np.int64)[n_obj] * count
        done[text] = t
    return num, den
