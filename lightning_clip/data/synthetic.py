"""A grounded synthetic image-caption world: coloured shapes on a noisy background.

Every image carries its own ground truth (the objects and their attributes) and every caption its
constraints and specificity level, so that retrieval can be scored *semantically*: a caption is
relevant to every image that satisfies all of its constraints (`lightning_clip.data.oracle`), not
only to the image it was written for.

World
- 1 to 3 objects per image on distinct cells of a 3x3 grid; each object has a shape, a colour, a size
  and a position. Objects are large relative to the image and the colours are far apart in RGB so that
  a tiny ViT learns the task in minutes on a CPU.
- Captions at four specificity levels: 1 one attribute ("a red thing", "a circle"), 2 colour + shape,
  3 size + colour + shape, 4 size + colour + shape + position. Images with several objects also get
  conjunctions ("a red circle and a blue square"): every described object must be present, as a
  *distinct* object of the scene.
- Duplicates: with probability ``duplicate_rate`` a sample re-uses one scene of a small pool of
  "popular" scenes, rendered byte-identically (same image id) with freshly drawn captions, so batches
  contain identical images and identical captions at a controlled rate.

Ids (all stored in ``KEY.json``)
- ``image_id``: one per rendered image; pool duplicates share it.
- ``group``: a hash of the canonical scene, so identical scenes (duplicates, or two single-object
  scenes that happen to coincide) share it. Every caption of an image carries its image's group: one id
  per item cannot express many-to-many relevance (all images with "a red thing"), that is what the
  oracle is for.
- ``captions[k].text_id``: a hash of the caption text, shared by identical captions everywhere.
Ids are 53-bit hashes: compare them for equality, never use them as indices.

Determinism: every sample draws from its own ``numpy`` generator seeded by (seed, split, index), the
tar headers have a fixed mtime and owner, JSON is written with sorted keys, and Pillow's JPEG encoder is
deterministic for a given libjpeg build. The same seed gives byte-identical shards.

CLI::

    python -m lightning_clip.data.synthetic --out data/synthetic --num-train 20000 --num-val 500 --seed 0
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
# Named colours far apart in RGB (and from the grey background) so that colour is easy to learn.
COLORS = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (20, 190, 40),
    "cyan": (0, 220, 230),
    "blue": (20, 50, 240),
    "purple": (150, 30, 200),
    "white": (255, 255, 255),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top middle", "top right",
             "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
_COLOR_NAMES = tuple(COLORS)
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS}
# Which attributes a description mentions at each specificity level (level 1 picks one of the two).
LEVEL_ATTRIBUTES = {1: (("color",), ("shape",)),
                    2: (("color", "shape"),),
                    3: (("size", "color", "shape"),),
                    4: (("size", "color", "shape", "position"),)}
MAX_OBJECTS = 3
SPLIT_CODES = {"train": 1, "val": 2, "pool": 3, "test": 4}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_THING_WORDS = ("thing", "object", "shape")
_SENTENCES = ("{}", "a picture of {}", "there is {}", "an image with {}", "{} on a grey background",
              "a photo showing {}")


def stable_id(text: str) -> int:
    """A 53-bit id from a string: stable across processes and runs (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") >> 11


def canonical_scene(scene: dict) -> str:
    return json.dumps(sorted((o["position"], o["shape"], o["color"], o["size"]) for o in scene["objects"]))


# ----------------------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random) -> dict:
    n = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    objects = [{"shape": rng.choice(SHAPES),
                "color": rng.choice(_COLOR_NAMES),
                "size": rng.choice(SIZES),
                "position": POSITIONS[c]} for c in cells]
    return {"objects": objects}


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


@functools.lru_cache(maxsize=8)
def _noise_tile(size: int) -> np.ndarray:
    # Pixel noise is cropped at a random offset from one fixed tile: drawing 3*S*S normals per image
    # was most of the generation time, and a fixed tile keeps the output deterministic.
    return np.random.default_rng(1234).normal(0.0, 10.0, size=(2 * size, 2 * size, 3)).astype(np.int16)


def render(scene: dict, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene: a grey background with per-image tint and pixel noise, shapes on grid cells."""
    s = image_size
    dy, dx = rng.randrange(s), rng.randrange(s)
    base = rng.randrange(90, 150)
    tint = np.array([base + rng.randint(-15, 15) for _ in range(3)], dtype=np.int16)
    noise = _noise_tile(s)[dy:dy + s, dx:dx + s] + tint
    img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for o in scene["objects"]:
        row, col = divmod(POSITIONS.index(o["position"]), 3)
        cx = (col + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        cy = (row + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        r = cell * (0.44 if o["size"] == "large" else 0.26)
        fill = COLORS[o["color"]]
        shape = o["shape"]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif shape == "cross":
            w = r * 0.35
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        else:  # star
            draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    return img


# --------------------------------------------------------------------------------------- captions
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: dict, attrs: tuple[str, ...], rng: random.Random) -> str:
    words = []
    if "size" in attrs:
        words.append(rng.choice(_SIZE_WORDS[obj["size"]]))
    if "color" in attrs:
        words.append(obj["color"])
    words.append(obj["shape"] if "shape" in attrs else rng.choice(_THING_WORDS))
    phrase = _article(" ".join(words))
    if "position" in attrs:
        phrase += rng.choice((" in the ", " at the ")) + obj["position"]
    return phrase


def sample_caption(scene: dict, rng: random.Random) -> dict:
    """One caption of ``scene`` with its constraints and specificity level."""
    objects = scene["objects"]
    level = rng.randint(1, 4)
    n = 1
    if len(objects) > 1 and rng.random() < 0.5:
        n = rng.randint(2, len(objects))
    chosen = sorted(rng.sample(range(len(objects)), n))
    phrases, described = [], []
    for i in chosen:
        options = LEVEL_ATTRIBUTES[level]
        attrs = rng.choice(options)
        phrases.append(_describe(objects[i], attrs, rng))
        described.append({a: objects[i][a] for a in attrs})
    np_ = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = rng.choice(_SENTENCES).format(np_)
    return {"text": text, "level": level, "constraints": {"objects": described},
            "text_id": stable_id(text)}


def synthetic_tokenizer():
    """The world's tokenizer: one token per word of its closed vocabulary (the world hands its words to
    the tokenizer module, which knows nothing of the world)."""
    from lightning_clip.models.tokenizer import tokenizer_from_words

    return tokenizer_from_words(vocabulary())


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain (the generator's tokenizer has exactly these)."""
    words = set(SHAPES) | set(COLORS) | set(_THING_WORDS) | {"a", "an", "and", "in", "at", "the", ","}
    for group in (_SIZE_WORDS.values(), POSITIONS, _SENTENCES):
        for item in group:
            for w in (item if isinstance(item, tuple) else (item,)):
                words.update(w.replace("{}", " ").replace(",", " , ").split())
    return sorted(words)


# ---------------------------------------------------------------------------------------- samples
def _rng(seed: int, split: str, index: int) -> random.Random:
    # One generator per sample: order-independent, so samples could be generated in any order/process.
    # (random.Random seeded with a string is stable across runs and platforms.)
    return random.Random(f"{seed}/{SPLIT_CODES[split]}/{index}")


def make_sample(index: int, split: str, seed: int = 0, image_size: int = 64, num_captions: int = 5,
                duplicate_rate: float = 0.0, duplicate_pool: int = 64) -> dict:
    """The webdataset sample (``__key__``, ``jpg``, ``txt``, ``json`` as bytes) for one index."""
    rng = _rng(seed, split, index)
    if duplicate_rate > 0 and rng.random() < duplicate_rate:
        # A popular scene: same scene, same pixels (its own render seed), same image id.
        source = rng.randrange(duplicate_pool)
        src_rng = _rng(seed, "pool", source)
        scene = sample_scene(src_rng)
        image_id = stable_id(f"synthetic/pool/{seed}/{source}")
    else:
        src_rng = rng
        scene = sample_scene(rng)
        image_id = stable_id(f"synthetic/{split}/{seed}/{index}")
    img = render(scene, image_size, src_rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    captions = [sample_caption(scene, rng) for _ in range(num_captions)]
    key = f"{index:09d}"
    meta = {"key": key, "split": split, "caption": captions[0]["text"],
            "all_captions": [c["text"] for c in captions], "captions": captions,
            "scene": scene, "num_objects": len(scene["objects"]), "image_id": image_id,
            "group": stable_id(canonical_scene(scene)), "width": image_size, "height": image_size}
    return {"__key__": key, "jpg": buf.getvalue(), "txt": captions[0]["text"].encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")}


def write_split(out_dir: Path, split: str, num: int, shard_size: int = 2500, min_shards: int = 4,
                **sample_kw) -> list[Path]:
    """Write ``num`` samples as ``out_dir/shard-%06d.tar``; at least ``min_shards`` shards when there
    are enough samples, so validation splits across workers and nodes."""
    from webdataset import ShardWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, min(shard_size, math.ceil(num / min_shards)))
    # Fixed mtime/owner make the tar bytes depend on the content only.
    writer = ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0,
                         user="synthetic", group="synthetic", mode=0o444, encoder=False)
    for i in range(num):
        writer.write(make_sample(i, split, **sample_kw))
    writer.close()
    return sorted(out_dir.glob("shard-*.tar"))


def generate(out: str | os.PathLike, num_train: int = 20000, num_val: int = 500, seed: int = 0,
             duplicate_rate: float = 0.0, image_size: int = 64, num_captions: int = 5,
             shard_size: int = 2500, duplicate_pool: int = 64, num_test: int = 500) -> Path:
    """Write ``out/train``, ``out/val``, ``out/test`` and ``out/tokenizer.json`` (overwrites files of the
    same name).

    The test split is drawn from the same seed under its own split code, so it shares no image with
    train or val, and adding it never changes their bytes (every sample has its own generator). It is
    for final evaluation only (`python -m lightning_clip eval --split=test`), never for choosing a model.
    Prefer `ensure_generated` from code: it is atomic."""
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size} is outside 8..1024")
    if not 0.0 <= duplicate_rate <= 1.0:
        raise ValueError(f"duplicate_rate={duplicate_rate} must be in [0, 1]")
    out = Path(out)
    kw = dict(seed=seed, image_size=image_size, num_captions=num_captions,
              duplicate_rate=duplicate_rate, duplicate_pool=duplicate_pool)
    write_split(out / "train", "train", num_train, shard_size=shard_size, **kw)
    write_split(out / "val", "val", num_val, shard_size=shard_size, **kw)
    if num_test > 0:
        write_split(out / "test", "test", num_test, shard_size=shard_size, **kw)
    (out / "tokenizer.json").write_text(synthetic_tokenizer().backend_tokenizer.to_str(), encoding="utf-8")
    _write_generator_json(out, dict(num_train=num_train, num_val=num_val, num_test=num_test,
                                    shard_size=shard_size, **kw))
    return out


def _write_generator_json(out: Path, params: dict) -> None:
    (out / "generator.json").write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")


def ensure_test_split(out: str | os.PathLike, num_test: int = 500) -> Path:
    """Add ``out/test`` to a world generated before worlds had a test split, with the parameters in its
    ``generator.json`` (so the images are the ones a fresh generation would make); atomic like
    `ensure_generated`. Returns the test folder."""
    out = Path(out)
    test = out / "test"
    if test.exists():
        return test
    meta = out / "generator.json"
    if not meta.exists():
        raise FileNotFoundError(f"{out} has no test split and no generator.json to make one from (not a "
                                "synthetic world?); give the evaluation shards explicitly")
    params = json.loads(meta.read_text())
    kw = {k: params[k] for k in ("seed", "image_size", "num_captions", "duplicate_rate", "duplicate_pool")
          if k in params}
    tmp = Path(tempfile.mkdtemp(prefix=".test.tmp-", dir=out))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        write_split(tmp, "test", num_test, shard_size=params.get("shard_size", 2500), **kw)
        try:
            os.rename(tmp, test)
        except OSError:
            if not test.exists():
                raise
        _write_generator_json(out, {**params, "num_test": num_test})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return test


def ensure_generated(out: str | os.PathLike, **kw) -> Path:
    """Generate the world into ``out`` unless it exists, atomically.

    Writes into a temporary sibling directory and renames it into place, so an interrupted run leaves
    no half dataset under ``out`` and two concurrent runs both end with one complete copy (the loser of
    the rename discards its own).
    """
    out = Path(out)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
    try:
        generate(tmp, **kw)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=500, help="held-out test split (final evaluation only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duplicate-rate", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-captions", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--force", action="store_true", help="regenerate even if --out exists")
    a = p.parse_args(list(argv) if argv is not None else None)
    out = Path(a.out)
    if out.exists() and a.force:
        shutil.rmtree(out)
    t0 = time.perf_counter()
    existed = out.exists()
    ensure_generated(out, num_train=a.num_train, num_val=a.num_val, seed=a.seed,
                     duplicate_rate=a.duplicate_rate, image_size=a.image_size,
                     num_captions=a.num_captions, shard_size=a.shard_size, num_test=a.num_test)
    if existed and a.num_test > 0 and not (out / "test").exists():
        ensure_test_split(out, a.num_test)  # a world made before worlds had a test split
        print(f"{out} exists; added its test split ({a.num_test} samples)")
    elif existed:
        print(f"{out} exists; nothing to do (use --force to regenerate)")
    else:
        dt = time.perf_counter() - t0
        n = a.num_train + a.num_val + a.num_test
        print(f"wrote {n} samples to {out} in {dt:.1f}s ({n / dt:.0f} samples/s)")


if __name__ == "__main__":
    main()
