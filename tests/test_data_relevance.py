"""The batch's oracle relevance (`meta["relevance"]`) and caption sampling by specificity
(`data.caption_levels`, `data.caption_objects`)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_clip.data import ClipDataModule, oracle, synthetic as syn
from lightning_clip.data.batching import collate
from lightning_clip.data.shards import Record, SkipPolicy, iter_records
from lightning_clip.data.synthetic import synthetic_tokenizer
from _data_helpers import small_dm


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("world"), num_train=60, num_val=12, seed=0)


def _dm(world, **kw) -> ClipDataModule:
    return small_dm(world, **{"epoch_length": 64, **kw})


def _levels_by_key(world) -> dict[str, list[int]]:
    out = {}
    for shard in sorted((world / "train").glob("*.tar")):
        for r in iter_records(str(shard), SkipPolicy(True)):
            out[r.key] = [c["level"] for c in r.caption_info]
    return out


def _record(key, scene, captions, levels=None):
    info = None if scene is None else [{"level": lv, "constraints": c} for lv, (_, c) in zip(levels, captions)]
    return Record(shard="hand", key=key, image=torch.zeros(3, 8, 8, dtype=torch.uint8),
                  captions=[t for t, _ in captions], image_id=hash(key), group=hash(key), scene=scene,
                  caption_info=info)


RED_CIRCLE = {"shape": "circle", "color": "red", "size": "small", "position": "center"}
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "large", "position": "top left"}


# ------------------------------------------------------------------------------------------ relevance
def test_relevance_orientation_on_a_hand_built_batch():
    # image 0: a red circle; image 1: a blue square and a red circle
    a = _record("a", {"objects": [RED_CIRCLE]}, [("a red circle", {"objects": [{"color": "red", "shape": "circle"}]})],
                [2])
    b = _record("b", {"objects": [BLUE_SQUARE, RED_CIRCLE]},
                [("a blue square", {"objects": [{"color": "blue", "shape": "square"}]})], [2])
    x = torch.zeros(3, 8, 8)
    batch = collate([(a, 0, x), (b, 0, x)], synthetic_tokenizer(), 8, ground_truth=False)
    rel = batch["meta"]["relevance"]
    assert rel.dtype == torch.bool and rel.shape == (2, 2)
    # rows are images, columns captions: "a red circle" (caption 0) is true of image 1 too, "a blue square"
    # (caption 1) is not true of image 0
    assert rel.tolist() == [[True, False], [True, True]]
    assert "scene" not in batch["meta"] and "constraints" not in batch["meta"]
    # one of the two off-diagonal pairs is relevant: the false-negative share the training loop logs
    assert batch["meta"]["false_negative_share"].item() == pytest.approx(1 / 2)


def test_a_record_keeps_its_oracle_bits_and_repeats_give_the_same_matrix():
    # the loader worker's cache hands the same Record objects to many batches: the bitsets are made once
    a = _record("a", {"objects": [RED_CIRCLE]}, [("a red thing", {"objects": [{"color": "red"}]}),
                                                 ("a blue square", {"objects": [{"color": "blue", "shape": "square"}]})],
                [1, 2])
    b = _record("b", {"objects": [BLUE_SQUARE, RED_CIRCLE]},
                [("a square and a circle", {"objects": [{"shape": "square"}, {"shape": "circle"}]})], [2])
    x = torch.zeros(3, 8, 8)
    items = [(a, 0, x), (b, 0, x), (a, 1, x), (b, 0, x)]
    first = collate(items, synthetic_tokenizer(), 8, ground_truth=True)["meta"]
    assert a.oracle_bits is not None and len(a.oracle_bits[1]) == 2
    a.oracle_bits = (a.oracle_bits[0], [[], []])  # a memo that is read: the next batch must follow it
    assert collate(items, synthetic_tokenizer(), 8)["meta"]["relevance"][:, [0, 2]].all()
    a.oracle_bits = None
    again = collate(items, synthetic_tokenizer(), 8, ground_truth=True)["meta"]
    loop = torch.tensor([[oracle.matches(c, s) for c in first["constraints"]] for s in first["scene"]])
    assert torch.equal(first["relevance"], loop) and torch.equal(again["relevance"], loop)
    assert not loop.all()  # the hand-built batch has irrelevant pairs: the check could fail


def test_real_data_gets_no_relevance():
    a = _record("a", None, [("a red circle", None)])
    b = _record("b", {"objects": [RED_CIRCLE]}, [("a red circle", {"objects": [{"color": "red"}]})], [1])
    x = torch.zeros(3, 8, 8)
    for items in ([(a, 0, x), (a, 0, x)], [(a, 0, x), (b, 0, x)]):  # all real, and mixed
        for gt in (True, False):
            meta = collate(items, synthetic_tokenizer(), 8, ground_truth=gt)["meta"]
            assert "relevance" not in meta and "false_negative_share" not in meta


@pytest.mark.parametrize("batching", ["image", "caption"])
def test_training_and_validation_batches_carry_the_oracle_matrix(world, batching):
    dm = _dm(world, batching=batching)
    b = next(iter(dm.train_dataloader()))
    rel = b["meta"]["relevance"]
    assert rel.dtype == torch.bool and rel.shape == (8, 8) and rel.diagonal().all()
    assert "scene" not in b["meta"]
    off = rel.sum() - rel.diagonal().sum()
    assert b["meta"]["false_negative_share"].item() == pytest.approx(off.item() / (8 * 7))
    same_group = b["meta"]["image_group"][:, None] == b["meta"]["text_group"][None, :]
    assert rel[same_group].all()  # an identical scene satisfies the caption
    # against the brute-force oracle on validation batches, which keep the dicts
    for b in dm.val_dataloader():
        m = b["meta"]
        loop = torch.tensor([[oracle.matches(c, s) for c in m["constraints"]] for s in m["scene"]])
        assert torch.equal(m["relevance"], loop)


# ----------------------------------------------------------------------------------- caption levels
def test_image_batching_draws_only_the_chosen_levels_or_falls_back(world):
    levels = _levels_by_key(world)
    chosen = {3, 4}
    dm = _dm(world, caption_levels=[4, 3])
    seen = Counter()
    for b in dm.train_dataloader():
        for key, s in zip(b["meta"]["key"], b["meta"]["specificity"].tolist()):
            own = levels[key.split("#")[0]]
            if chosen & set(own):
                assert s in chosen, (key, s, own)
                seen["filtered"] += 1
            else:
                assert s in own  # no caption at those levels: any of its own captions
                seen["fallback"] += 1
    assert seen["filtered"] > 0


def test_all_levels_is_the_unfiltered_stream(world):
    keys = lambda dm: [k for b in dm.train_dataloader() for k in b["meta"]["key"]]  # noqa: E731
    assert keys(_dm(world, caption_levels=[1, 2, 3, 4])) == keys(_dm(world))


def test_caption_batching_emits_only_the_chosen_levels(world):
    dm = _dm(world, batching="caption", caption_levels=[1])
    specs = [s for b in dm.train_dataloader() for s in b["meta"]["specificity"].tolist()]
    assert specs and set(specs) == {1}
    everything = [s for b in _dm(world, batching="caption").train_dataloader() for s in b["meta"]["specificity"].tolist()]
    assert set(everything) == {1, 2, 3, 4}


def test_validation_ignores_caption_levels(world):
    keys = lambda dm: Counter(k for b in dm.val_dataloader() for k in b["meta"]["key"])  # noqa: E731
    assert keys(_dm(world, caption_levels=[1])) == keys(_dm(world))


def _described_by_key(world) -> dict[tuple[str, int], tuple[int, int]]:
    """(key, caption index) -> (level, number of objects the caption describes)."""
    out = {}
    for shard in sorted((world / "train").glob("*.tar")):
        for r in iter_records(str(shard), SkipPolicy(True)):
            for k, c in enumerate(r.caption_info):
                out[r.key, k] = (c["level"], len(c["constraints"]["objects"]))
    return out


def test_caption_objects_keeps_only_captions_of_that_many_objects(world):
    truth = _described_by_key(world)
    emitted = lambda dm: [truth[k.split("#")[0], int(k.split("#")[1])]  # noqa: E731
                          for b in dm.train_dataloader() for k in b["meta"]["key"]]
    both = emitted(_dm(world, batching="caption", caption_levels=[1], caption_objects=[1]))
    assert both and set(both) == {(1, 1)}
    only_objects = emitted(_dm(world, batching="caption", caption_objects=[2, 3]))
    assert only_objects and {n for _, n in only_objects} == {2, 3}
    assert len({lv for lv, _ in only_objects}) > 1  # levels are not filtered by it
    # the unfiltered stream has every count, so the filter did the work
    assert {n for _, n in emitted(_dm(world, batching="caption"))} == {1, 2, 3}


def test_vague_single_object_captions_raise_the_false_negative_share(world):
    # the knob exists for the `duplicates` ablation: one-attribute captions about one object fit the most
    # images, so more of a batch's off-diagonal pairs are relevant than with all captions (image batching:
    # under caption batching an image repeating in its batch dominates the share of 8 items)
    def share(dm):
        rels = [b["meta"]["relevance"] for b in dm.train_dataloader()]
        return sum(float(r.sum() - r.diagonal().sum()) for r in rels) / sum(r.numel() - len(r) for r in rels)
    assert share(_dm(world, caption_levels=[1], caption_objects=[1])) > 2 * share(_dm(world))


@pytest.mark.parametrize("objects", [[0], [4], [], ["1"], [True]])
def test_bad_caption_objects_name_the_option(world, objects):
    with pytest.raises(ValueError, match=r"data\.caption_objects=.*1, 2, 3"):
        _dm(world, caption_objects=objects)


@pytest.mark.parametrize("levels", [[0], [5], [1, 7], [], ["4"], [True]])
def test_bad_caption_levels_name_the_option(world, levels):
    with pytest.raises(ValueError, match=r"data\.caption_levels=.*1, 2, 3, 4"):
        _dm(world, caption_levels=levels)


def test_caption_levels_on_real_data_fail_clearly(world, tmp_path):
    import shutil

    import webdataset as wds
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    (tmp_path / "real").mkdir()
    with wds.TarWriter(str(tmp_path / "real" / "s.tar"), encoder=False) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": b"a red square"})
    shutil.copy(world / "tokenizer.json", tmp_path / "tokenizer.json")
    dm = _dm(tmp_path, train_shards=str(tmp_path / "real"), val_shards=str(tmp_path / "real"),
             tokenizer=str(tmp_path / "tokenizer.json"), caption_levels=[4], batch_size=2, epoch_length=2)
    with pytest.raises(ValueError, match=r"data\.caption_levels=\[4\] needs caption specificity levels.*'k\d'"):
        next(iter(dm.train_dataloader()))
