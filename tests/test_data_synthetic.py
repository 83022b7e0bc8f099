"""The synthetic world: determinism, the relevance oracle, captions, duplicates, atomic generation."""
from __future__ import annotations

import random

import hashlib
import io
import json
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from lightning_clip.data import oracle, synthetic as syn


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(shard_dir: Path) -> list[dict]:
    out = defaultdict(dict)
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out[key][ext] = t.extractfile(m).read()
    return [dict(v, key=k) for k, v in sorted(out.items())]


def test_same_seed_gives_byte_identical_shards(tmp_path):
    kw = dict(num_train=40, num_val=8, duplicate_rate=0.25)
    a = _digest(syn.generate(tmp_path / "a", seed=3, **kw))
    time.sleep(1.1)  # a tar mtime taken from the clock would now differ
    b = _digest(syn.generate(tmp_path / "b", seed=3, **kw))
    c = _digest(syn.generate(tmp_path / "c", seed=4, **kw))
    assert {"train/shard-000000.tar", "val/shard-000000.tar", "tokenizer.json"} <= set(a)
    assert a == b
    assert a["train/shard-000000.tar"] != c["train/shard-000000.tar"]


SCENE = {"objects": [
    {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
    {"shape": "square", "color": "blue", "size": "small", "position": "center"},
    {"shape": "circle", "color": "green", "size": "small", "position": "bottom right"},
]}


@pytest.mark.parametrize("objects, expected", [
    ([{"color": "red"}], True),
    ([{"shape": "square"}], True),
    ([{"color": "red", "shape": "square"}], False),          # both attributes, one object
    ([{"size": "small", "color": "blue", "shape": "square", "position": "center"}], True),
    ([{"size": "small", "color": "blue", "shape": "square", "position": "top left"}], False),
    ([{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}], True),
    ([{"color": "red", "shape": "circle"}, {"color": "yellow", "shape": "square"}], False),
    ([{"shape": "circle"}, {"shape": "circle"}], True),      # two distinct circles exist
    ([{"color": "red"}, {"color": "red"}], False),           # only one red object: needs two distinct
    ([{"shape": "circle"}, {"shape": "circle"}, {"shape": "circle"}], False),
    ([{"shape": "circle"}, {"shape": "square"}, {"color": "green"}], True),
])
def test_oracle_on_hand_made_scene(objects, expected):
    c = {"objects": objects}
    assert oracle.matches(c, SCENE) is expected
    assert bool(oracle.relevance_matrix([c], [SCENE])[0, 0]) is expected


def test_oracle_rejects_unknown_values_and_missing_ground_truth():
    with pytest.raises(ValueError, match="unknown color 'mauve'"):
        oracle.matches({"objects": [{"color": "mauve"}]}, SCENE)
    with pytest.raises(ValueError, match="unknown color 'mauve'"):
        oracle.relevance_matrix([{"objects": [{"color": "mauve"}]}], [SCENE])
    with pytest.raises(ValueError, match="real data"):
        oracle.matches(None, SCENE)


def test_relevance_matrix_equals_matches_loop():
    rng = random.Random(0)
    scenes = [syn.sample_scene(rng) for _ in range(120)] + [SCENE, {"objects": []}]
    caps = [syn.sample_caption(scenes[i % 120], rng)["constraints"] for i in range(150)]
    caps += [{"objects": [{"shape": "circle"}, {"shape": "circle"}]}, {"objects": []}]
    m = oracle.relevance_matrix(caps, scenes, chunk=37)  # a chunk that does not divide the rows
    loop = torch.tensor([[oracle.matches(c, s) for s in scenes] for c in caps])
    assert m.dtype == torch.bool and m.shape == (len(caps), len(scenes))
    assert torch.equal(m, loop)
    assert m[torch.arange(150), torch.arange(150) % 120].all()  # a caption matches its own image
    assert 0 < m.float().mean() < 1


def test_captions_follow_their_level():
    rng = random.Random(1)
    seen_levels, conj = set(), 0
    for _ in range(300):
        scene = syn.sample_scene(rng)
        c = syn.sample_caption(scene, rng)
        seen_levels.add(c["level"])
        conj += len(c["constraints"]["objects"]) > 1
        for d in c["constraints"]["objects"]:
            assert tuple(sorted(d)) in {tuple(sorted(a)) for a in syn.LEVEL_ATTRIBUTES[c["level"]]}
            for v in d.values():
                assert v in c["text"] or v in ("small", "large")  # sizes have synonyms
        assert oracle.matches(c["constraints"], scene)
        assert set(c["text"].replace(",", " ").split()) <= set(syn.vocabulary())
    assert seen_levels == {1, 2, 3, 4} and conj > 30


def test_duplicate_rate_controls_identical_images(tmp_path):
    def ids(rate):
        samples = _samples(syn.write_split(tmp_path / str(rate), "train", 200, duplicate_rate=rate)[0].parent)
        by_id = defaultdict(list)
        for s in samples:
            by_id[json.loads(s["json"])["image_id"]].append(s)
        return by_id

    assert all(len(v) == 1 for v in ids(0.0).values())
    dup = ids(0.5)
    repeated = [v for v in dup.values() if len(v) > 1]
    assert 60 <= sum(len(v) for v in repeated) <= 140
    for group in repeated:
        assert len({s["jpg"] for s in group}) == 1                       # byte-identical pixels
        assert len({json.loads(s["json"])["group"] for s in group}) == 1  # one group id


def test_generated_json_carries_ground_truth(tmp_path):
    s = _samples(syn.write_split(tmp_path, "val", 5)[0].parent)[0]
    meta = json.loads(s["json"])
    assert meta["all_captions"][0] == meta["caption"] == s["txt"].decode()
    assert len(meta["captions"]) == len(meta["all_captions"]) == 5
    assert meta["num_objects"] == len(meta["scene"]["objects"])
    assert meta["group"] == syn.stable_id(syn.canonical_scene(meta["scene"]))
    from PIL import Image
    assert Image.open(io.BytesIO(s["jpg"])).size == (64, 64)


def test_ensure_generated_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "world"

    def interrupted(path, **kw):
        (Path(path) / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        syn.ensure_generated(out, num_train=10)
    assert list(tmp_path.iterdir()) == []          # neither a half dataset nor a temp dir left
    monkeypatch.undo()
    syn.ensure_generated(out, num_train=10, num_val=4)
    before = _digest(out)
    syn.ensure_generated(out, num_train=99)          # present: untouched
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["world"]


def test_cli_writes_splits_and_tokenizer(tmp_path, capsys):
    syn.main(["--out", str(tmp_path / "w"), "--num-train", "12", "--num-val", "4", "--image-size", "32"])
    assert "samples/s" in capsys.readouterr().out
    assert (tmp_path / "w/tokenizer.json").is_file()
    s = _samples(tmp_path / "w/train")
    assert len(s) == 12 and len(_samples(tmp_path / "w/val")) == 4


# ------------------------------------------------------------------------------------------ test split
def test_test_split_is_held_out_and_leaves_train_and_val_unchanged(tmp_path):
    kw = dict(num_train=20, num_val=6, seed=5)
    with_test = syn.generate(tmp_path / "a", num_test=6, **kw)
    without = syn.generate(tmp_path / "b", num_test=0, **kw)
    a, b = _digest(with_test), _digest(without)
    assert "test/shard-000000.tar" in a and not any(k.startswith("test/") for k in b)
    for split in ("train", "val"):  # adding a test split changes no byte of the others
        assert {k: v for k, v in a.items() if k.startswith(split)} == {k: v for k, v in b.items() if k.startswith(split)}
    ids = lambda split: {json.loads(s["json"])["image_id"] for s in _samples(with_test / split)}  # noqa: E731
    assert len(ids("test")) == 6 and not ids("test") & (ids("val") | ids("train"))


def test_a_world_without_a_test_split_gets_the_one_a_fresh_world_would_have(tmp_path):
    kw = dict(num_train=12, num_val=4, seed=2, image_size=32)
    old = syn.ensure_generated(tmp_path / "old", num_test=0, **kw)
    fresh = syn.ensure_generated(tmp_path / "fresh", num_test=5, **kw)
    assert not (old / "test").exists()
    syn.ensure_test_split(old, num_test=5)
    assert _digest(old / "test") == _digest(fresh / "test")
    assert json.loads((old / "generator.json").read_text())["num_test"] == 5
    (tmp_path / "not-a-world").mkdir()
    with pytest.raises(FileNotFoundError, match="no generator.json"):
        syn.ensure_test_split(tmp_path / "not-a-world")
