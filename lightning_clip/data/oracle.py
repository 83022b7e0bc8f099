"""The synthetic world's relevance oracle: which captions are true of which images.

A caption is relevant to every image that satisfies all of its described objects, each by a distinct
object of the scene (`matches`); `relevance_matrix` computes a whole ``[captions, images]`` table with
attribute bitsets, and `object_bits`/`relevance_from_bits` let a loader worker keep each record's bitsets
and reuse them batch after batch.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch

from lightning_clip.data.synthetic import ATTRIBUTES


def _check_values(obj: dict, what: str) -> None:
    for attr, value in obj.items():
        if attr not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attr!r} in {what}; choices: {sorted(ATTRIBUTES)}")
        if value not in ATTRIBUTES[attr]:
            raise ValueError(f"unknown {attr} {value!r} in {what}; choices: {list(ATTRIBUTES[attr])}")


def matches(constraints: dict, scene: dict) -> bool:
    """Whether ``scene`` satisfies every described object of ``constraints``, each by a distinct object.

    ``constraints = {"objects": [{"color": "red", "shape": "circle"}, ...]}``,
    ``scene = {"objects": [{"shape", "color", "size", "position"}, ...]}``.
    """
    if constraints is None or scene is None:
        raise ValueError("matches() needs synthetic ground truth; got None (real data has no oracle)")
    wanted, objects = constraints["objects"], scene["objects"]
    for d in wanted:
        _check_values(d, "constraints")
    if len(wanted) > len(objects):
        return False
    # At most 3 objects: trying every injective assignment is cheaper than a matching algorithm.
    for chosen in itertools.permutations(objects, len(wanted)):
        if all(all(o.get(a) == v for a, v in d.items()) for d, o in zip(wanted, chosen)):
            return True
    return False


_BIT = {}
_offset = 0
for _attr, _values in ATTRIBUTES.items():
    for _v in _values:
        _BIT[(_attr, _v)] = 1 << _offset
        _offset += 1


# Every real object and every description also carries this bit, so that a padding slot (0) satisfies
# no description, not even one that names no attribute.
_REAL = 1 << _offset


_BITS_CACHE: dict[tuple, int] = {}  # (attribute, value) pairs -> bitset; at most a few thousand keys


def _bits(obj: dict, what: str) -> int:
    key = tuple(obj.items())
    bits = _BITS_CACHE.get(key)
    if bits is None:
        try:
            bits = sum(_BIT[a] for a in key) | _REAL
        except KeyError:
            _check_values(obj, what)
            raise
        _BITS_CACHE[key] = bits
    return bits


def object_bits(item: Optional[dict], what: str, index: int = 0) -> list[int]:
    """The attribute bitsets of a scene's objects, or of a description's (``{"objects": [...]}``), as
    `relevance_matrix` compares them. A loader worker keeps them with each record (`Record.oracle_bits`)
    so that a batch's matrix skips this per-object Python."""
    if item is None:
        raise ValueError(f"{what} {index} is None: real data has no ground truth for the oracle")
    return [_bits(o, what) for o in item["objects"]]


def _pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of attribute bitsets (0-padded) and the number of real entries per row."""
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    width = max(int(counts.max(initial=0)), 1)
    out = np.array([list(r) + [0] * (width - len(r)) for r in rows], dtype=np.int32).reshape(len(rows), width)
    return out, counts


def relevance_matrix(constraints_list: Sequence[dict], scenes_list: Sequence[dict],
                     chunk: int = 1024) -> torch.BoolTensor:
    """``[n_captions, n_images]``: entry (c, i) is ``matches(constraints_list[c], scenes_list[i])``.

    Each object is an attribute bitset (one bit per attribute value, plus a "real object" bit that
    padding lacks); a description is satisfied by an object when ``object & description ==
    description``. Distinctness of the matched objects is enforced by trying every injective
    assignment of descriptions to (0-padded) object slots, all at once by fancy indexing. Captions are
    processed grouped by their number of descriptions k, so the common k = 1 costs one comparison per
    slot instead of every permutation. numpy, not torch: on a training batch (64 x 64, in the loader
    worker) the per-call overhead of a few dozen small torch ops would cost more than the work itself.
    """
    return relevance_from_bits([object_bits(c, "constraints", i) for i, c in enumerate(constraints_list)],
                               [object_bits(s, "scene", i) for i, s in enumerate(scenes_list)], chunk)


def relevance_from_bits(description_bits: Sequence[Sequence[int]], scene_bits: Sequence[Sequence[int]],
                        chunk: int = 1024) -> torch.BoolTensor:
    """`relevance_matrix` from the captions' and the scenes' `object_bits`."""
    desc, n_desc = _pad(description_bits)
    objs, _ = _pad(scene_bits)
    slots = max(desc.shape[1], objs.shape[1])
    objs = np.pad(objs, ((0, 0), (0, slots - objs.shape[1])))
    out = np.zeros((len(description_bits), len(scene_bits)), dtype=bool)
    for k in np.unique(n_desc).tolist():
        rows = np.flatnonzero(n_desc == k)
        if k == 0:
            out[rows] = True
            continue
        perms = np.array(list(itertools.permutations(range(slots), k)))  # [P, k] injective assignments
        for start in range(0, rows.size, chunk):
            r = rows[start:start + chunk]
            d = desc[r, :k][:, None, :, None]                                # [C, 1, k, 1]
            sat = (objs[None, :, None, :] & d) == d                          # [C, I, k, slots]
            # [C, I, P, k]: description a satisfied by slot perms[p, a]; some assignment satisfies all
            out[r] = sat[:, :, np.arange(k)[None, :], perms].all(-1).any(-1)
    return torch.from_numpy(out)
