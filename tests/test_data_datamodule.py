"""ClipDataModule: the batch contract, worker splitting, epochs, batching modes, bad input."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from lightning_clip.data import ClipDataModule, oracle, synthetic as syn
from lightning_clip.data.shards import BadSampleError, DataWarning, expand_shards
from _data_helpers import small_dm


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("world"), num_train=40, num_val=12, seed=0)


def _dm(world, **kw) -> ClipDataModule:
    return small_dm(world, **{"epoch_length": 32, **kw})


def _val_keys(world) -> list[str]:
    keys = []
    for shard in sorted((world / "val").glob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    keys += [f"{meta['key']}#{k}" for k in range(len(meta["all_captions"]))]
    return keys


def test_batch_follows_the_contract(world):
    dm = _dm(world)
    assert dm.vocab_size == len(syn.vocabulary()) + 4 and dm.pad_token_id == 0
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape == (8, 32)
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert torch.equal(b["input_ids"] == 0, b["attention_mask"] == 0)
    light = {"key", "caption", "image_id", "image_group", "text_group", "specificity", "num_objects"}
    # training batches carry no scene/constraint dicts (only validation reads them), only the oracle's matrix
    assert set(b["meta"]) == light | {"relevance", "false_negative_share"}
    b = next(iter(dm.val_dataloader()))
    m = b["meta"]
    assert set(m) == light | {"scene", "constraints", "relevance", "false_negative_share"}
    for name in ("image_id", "image_group", "text_group", "specificity", "num_objects"):
        assert m[name].shape == (8,) and m[name].dtype == torch.long
    assert all(1 <= s <= 4 for s in m["specificity"].tolist())
    for c, s, n, cap in zip(m["constraints"], m["scene"], m["num_objects"].tolist(), m["caption"]):
        assert oracle.matches(c, s) and n == len(s["objects"])
    # the tokens are the caption's words, one token each, between [CLS] and [SEP]
    words = m["caption"][0].replace(",", " , ").split()
    ids = b["input_ids"][0][b["attention_mask"][0].bool()].tolist()
    assert dm.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", *words, "[SEP]"]


def test_validation_sees_every_caption_once_with_two_workers(world):
    dm = _dm(world, num_workers=2, val_batch_size=7)
    expected = _val_keys(world)
    loader = dm.val_dataloader()
    passes = [[k for b in loader for k in b["meta"]["key"]] for _ in range(2)]
    assert len(expected) == 60
    assert Counter(passes[0]) == Counter(expected)  # nothing lost, nothing twice
    assert passes[0] == passes[1]                   # deterministic order
    by_id = {}
    for b in loader:                                # captions of one image share id and group
        for i, g in zip(b["meta"]["image_id"].tolist(), b["meta"]["image_group"].tolist()):
            assert by_id.setdefault(i, g) == g
    assert len(by_id) == 12


def test_validation_split_across_nodes_without_loss(world):
    seen = []
    for rank in range(3):
        dm = _dm(world)
        dm._world = lambda rank=rank: (rank, 3)
        dm.setup("validate")
        seen += [k for b in dm.val_dataloader() for k in b["meta"]["key"]]
    assert Counter(seen) == Counter(_val_keys(world))


def test_training_epochs_have_fixed_length_and_differ(world):
    dm = _dm(world, epoch_length=40, batch_size=8)
    loader = dm.train_dataloader()
    e1 = [k for b in loader for k in b["meta"]["key"]]
    e2 = [k for b in loader for k in b["meta"]["key"]]
    assert len(loader) == 5 and len(e1) == len(e2) == 40
    assert e1 != e2
    again = _dm(world, epoch_length=40, batch_size=8).train_dataloader()
    assert [k for b in again for k in b["meta"]["key"]] == e1   # same seed, same stream


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_position_continues_the_uninterrupted_stream(world, workers):
    # 6 batches per epoch; a checkpoint's (epoch, batches trained) resumes mid-epoch, and one saved at an
    # epoch's end continues with the next epoch
    def keys(state=None, epochs=3):
        dm = _dm(world, epoch_length=48, batch_size=8, num_workers=workers)
        dm.load_state_dict(state or {})
        loader = dm.train_dataloader()
        return [tuple(b["meta"]["key"]) for _ in range(epochs) for b in loader]

    full = keys()
    assert len(full) == 18 and len(set(full)) == 18
    for epoch, batches in ((0, 3), (1, 1), (0, 6)):
        resumed = keys({"train_epoch": epoch, "train_batches": batches}, epochs=2)
        start = epoch * 6 + batches
        assert resumed == full[start:start + len(resumed)] and len(resumed) == 12 - (batches % 6), (epoch, batches)


def test_caption_batching_repeats_images_with_shared_groups(world):
    dm = _dm(world, batching="caption", batch_size=10)
    b = next(iter(dm.train_dataloader()))
    counts = Counter(b["meta"]["image_id"].tolist())
    assert max(counts.values()) >= 2
    for i in counts:
        sel = b["meta"]["image_id"] == i
        assert b["meta"]["image_group"][sel].unique().numel() == 1
        assert torch.equal(b["meta"]["image_group"][sel], b["meta"]["text_group"][sel])


def test_generate_option_builds_the_world_before_setup(tmp_path, capsys):
    root = tmp_path / "gen"
    dm = ClipDataModule(str(root / "train"), str(root / "val"), batch_size=4, num_workers=0, epoch_length=8,
                        generate={"root": str(root), "seed": 1, "num_train": 12, "num_val": 4, "image_size": 32},
                        image_size=32)
    assert dm.vocab_size == len(syn.vocabulary()) + 4 and not root.exists()
    dm.setup("fit")
    assert f"data: {root} is absent; generating the synthetic world there" in capsys.readouterr().out
    assert (root / "tokenizer.json").is_file() and len(expand_shards(str(root / "val"))) == 4
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 32, 32)
    # without a root, only the default location (base.yaml's data/synthetic48) is ever generated
    with pytest.raises(FileNotFoundError, match=r"a/train.*matches no shard"):
        ClipDataModule(str(tmp_path / "a/train"), str(tmp_path / "a/val"), generate={"num_train": 4})
    assert not (tmp_path / "a").exists()


def test_generate_never_builds_where_the_shards_point_elsewhere(tmp_path):
    # a typo in the shard path: an error that names it and says how to build shards, and nothing written
    gen = {"root": str(tmp_path / "synthetic48"), "seed": 1, "num_train": 12, "num_val": 4, "image_size": 32}
    typo = tmp_path / "synthetc48"
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*synthetc48/train.*matches no shard.*"
                                                r"lightning_clip.data.convert.*make data"):
        ClipDataModule(str(typo / "train"), str(typo / "val"), num_workers=0, generate=gen)
    assert sorted(tmp_path.iterdir()) == []


def test_the_real_data_config_never_generates(tmp_path):
    # base.yaml's generate block is on; the Flickr8k delta over it must read its shards or fail
    from test_cli import BASE, parse

    missing = tmp_path / "flickr8k-96"
    cfg = parse("--config", str(BASE), "--config", str(BASE.parent / "real" / "flickr8k.yaml"),
                f"--data.train_shards={missing}/train", f"--data.val_shards={missing}/val")
    assert cfg.data.generate is None
    with pytest.raises(FileNotFoundError, match=r"flickr8k-96/train.*lightning_clip.data.convert flickr"):
        ClipDataModule(**{**cfg.data.as_dict(), "num_workers": 0})
    assert not missing.exists()


def test_pattern_matching_nothing_fails_with_the_pattern(world, tmp_path):
    pattern = str(tmp_path / "nowhere/shard-{000000..000003}.tar")
    dm = ClipDataModule(str(world / "train"), pattern, num_workers=0)
    with pytest.raises(FileNotFoundError, match="nowhere/shard-"):
        dm.setup("validate")
    # the three accepted forms agree
    brace = str(world / "val/shard-{000000..000003}.tar")
    assert expand_shards(str(world / "val")) == expand_shards(brace) == expand_shards(str(world / "val/*.tar"))
    with pytest.raises(ValueError, match="data.batching='words'"):
        ClipDataModule(str(world / "train"), batching="words")


# ------------------------------------------------------------------------------------------ bad input
def _jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


BAD = {
    "undecodable": ({"jpg": b"not an image", "txt": b"a red square"}, "undecodable image"),
    "nocaption": ({"jpg": None, "json": b'{"key": "x"}'}, "missing caption"),
    "badjson": ({"jpg": None, "txt": b"a red square", "json": b'{"caption": '}, "malformed JSON"),
}


def _write(path: Path, samples: dict[str, dict]) -> None:
    with TarWriter(str(path), encoder=False, mtime=0) as w:
        for key, files in samples.items():
            w.write({"__key__": key, **{e: (v if v is not None else _jpeg()) for e, v in files.items()}})


@pytest.fixture
def bad_shards(tmp_path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    good = {"jpg": None, "txt": b"a red square"}
    # img2dataset's own layout: a json without all_captions, or only a txt
    _write(d / "a-000000.tar", {"good0": good, **{k: v for k, (v, _) in BAD.items()},
                               "i2d": {"jpg": None, "json": b'{"caption": "a red square", "key": "i2d"}'}})
    _write(d / "a-000001.tar", {f"good{i}": good for i in range(1, 7)})
    raw = (d / "a-000001.tar").read_bytes()
    (d / "a-000001.tar").write_bytes(raw[:3 * 512 + 700])  # cut inside the second member's data
    return d


def _read_all(d, **kw):
    dm = ClipDataModule(str(d), str(d), batch_size=4, num_workers=kw.pop("num_workers", 0),
                        tokenizer=kw.pop("tokenizer"), **kw)
    dm.setup("validate")
    return dm, [k for b in dm.val_dataloader() for k in b["meta"]["key"]]


@pytest.fixture
def tok(world):
    return str(world / "tokenizer.json")


def test_bad_samples_are_skipped_with_shard_and_key_and_counted(bad_shards, tok):
    with pytest.warns(DataWarning) as rec:
        dm, keys = _read_all(bad_shards, tokenizer=tok)
    assert keys == ["good0#0", "i2d#0"]
    msgs = [str(w.message) for w in rec]
    for key, (_, reason) in BAD.items():
        assert any(f"a-000000.tar, key {key}: {reason}" in m for m in msgs), (key, msgs)
    assert any("a-000001.tar, key good1: truncated" in m in m for m in msgs), msgs
    assert dm.skipped == 4


def test_skips_in_workers_are_counted_in_the_main_process(bad_shards, tok):
    dm, keys = _read_all(bad_shards, tokenizer=tok, num_workers=2)
    assert sorted(keys) == ["good0#0", "i2d#0"] and dm.skipped == 4


@pytest.mark.parametrize("key", [*BAD, "truncated"])
def test_strict_raises_naming_shard_and_key(tmp_path, tok, key):
    good = {"jpg": None, "txt": b"a red square"}
    if key == "truncated":
        _write(tmp_path / "s.tar", {"k0": good, "k1": good})
        raw = (tmp_path / "s.tar").read_bytes()
        (tmp_path / "s.tar").write_bytes(raw[:3 * 512 + 700])
        shard, reason = "s.tar, key k0", "truncated"
    else:
        _write(tmp_path / "s.tar", {"k0": good, key: BAD[key][0]})
        shard, reason = f"s.tar, key {key}", BAD[key][1]
    with pytest.raises(BadSampleError, match=rf"{shard}: {reason}.*strict"):
        _read_all(tmp_path, tokenizer=tok, strict=True)


def test_url_shards_are_opened_with_gopen(world):
    shard = sorted((world / "val").glob("*.tar"))[0]
    dm = ClipDataModule(str(world / "train"), f"pipe:cat {shard}", batch_size=4, num_workers=0)
    dm.setup("validate")
    keys = [k for b in dm.val_dataloader() for k in b["meta"]["key"]]
    assert len(keys) == 5 * 3 and dm.skipped == 0


def test_device_transfer_moves_tensors_and_leaves_meta_lists_alone(world):
    dm = _dm(world)
    b = next(iter(dm.val_dataloader()))
    moved = dm.transfer_batch_to_device(b, torch.device("meta"), 0)
    assert moved["image"].device.type == moved["input_ids"].device.type == "meta"
    assert moved["meta"]["image_id"].device.type == "meta"
    assert moved["meta"]["scene"] is b["meta"]["scene"] and moved["meta"]["key"] is b["meta"]["key"]


def test_transform_takes_tensors_and_pil_alike_and_normalises():
    from PIL import Image

    from lightning_clip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

    x = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    t = ImageTransform(8)
    out = t(x)
    torch.testing.assert_close(out, t(pil))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert ImageTransform(4)(x).shape == (3, 4, 4)  # resize + centre crop when the size differs
    # the loader normalises whole (channels_last) batches: the same values, bit for bit, as image by image
    batch = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    once = t.normalize(batch)
    assert once.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(once, torch.stack([t(img) for img in batch]))


def test_prefetch_thread_yields_the_same_training_stream_over_epochs(world):
    # one worker process: the stream is a function of the seed, so with and without the receiving thread
    # the batches must be identical, epoch after epoch (persistent workers reuse one iterator, which the
    # previous epoch's thread must release first)
    def epochs(threaded: bool) -> list[list[str]]:
        loader = _dm(world, epoch_length=40, batch_size=8, num_workers=1).train_dataloader()
        loader.prefetch_thread = threaded
        out = [[k for b in loader for k in b["meta"]["key"]] for _ in range(3)]
        assert len(loader) == 5
        return out

    plain, threaded = epochs(False), epochs(True)
    assert threaded == plain and all(len(e) == 40 for e in threaded) and plain[0] != plain[1]
    assert _dm(world, num_workers=1).train_dataloader().prefetch_thread  # on for training


def _stream(dm, epochs: int) -> list[dict]:
    loader = dm.train_dataloader()
    return [b for _ in range(epochs) for b in loader]


def test_record_cache_gives_the_same_batches_and_skips_decoding(world, monkeypatch):
    from lightning_clip.data import stream

    reads = []
    real = stream.iter_records
    monkeypatch.setattr(stream, "iter_records", lambda shard, on_bad: reads.append(shard) or real(shard, on_bad))
    plain = _stream(_dm(world, epoch_length=40), 4)
    uncached_reads, reads[:] = len(reads), []
    dm = _dm(world, epoch_length=40, cache_records=1000)
    cached = _stream(dm, 4)
    assert len(cached) == len(plain) == 20
    for a, b in zip(plain, cached):
        assert a["meta"]["key"] == b["meta"]["key"]
        for name in ("image", "input_ids", "attention_mask"):
            assert torch.equal(a[name], b[name]), name
    shards = expand_shards(str(world / "train"), "train_shards")
    # every shard decoded at most once (a pass cut at an epoch's end may read one again), and all are kept
    assert len(reads) <= 2 * len(shards) < uncached_reads
    assert set(dm._train._cache) == set(shards) and dm._train._cached == 40


def test_record_cache_keeps_no_shard_with_a_bad_sample_nor_more_than_its_room(bad_shards, world, tok):
    def run(d, **kw):
        dm = ClipDataModule(str(d), str(d), batch_size=2, num_workers=0, epoch_length=8, shuffle_buffer=4,
                            tokenizer=tok, **kw)
        dm.setup("fit")
        with pytest.warns(DataWarning):
            keys = [k for b in _stream(dm, 3) for k in b["meta"]["key"]]
        return dm, keys

    plain, keys = run(bad_shards)
    dm, cached_keys = run(bad_shards, cache_records=100)
    # both shards have a bad sample: nothing kept, and the skips are warned and counted on every read
    assert dm._train._cache == {} and cached_keys == keys and dm.skipped == plain.skipped > 4
    small = _dm(world, epoch_length=40, cache_records=3)  # fewer than any shard holds
    _stream(small, 2)
    assert small._train._cache == {} and small._train._cached == 0
    with pytest.raises(ValueError, match="data.cache_records=-1"):
        _dm(world, cache_records=-1)


def test_small_tensors_leave_the_worker_by_value_and_arrive_as_the_same_tensors(world):
    from lightning_clip.data.loader import _Inline, _pack

    in_process = list(_dm(world, num_workers=0).val_dataloader())
    from_worker = list(_dm(world, num_workers=1).val_dataloader())
    assert len(in_process) == len(from_worker) > 1
    for a, b in zip(in_process, from_worker):
        for part_a, part_b in ((a, b), (a["meta"], b["meta"])):
            assert part_a.keys() == part_b.keys()
            for k, v in part_a.items():
                if isinstance(v, torch.Tensor):
                    w = part_b[k]
                    assert isinstance(w, torch.Tensor) and w.dtype == v.dtype and torch.equal(w, v), k
                elif k != "meta":
                    assert part_b[k] == v, k
    packed = _pack(in_process[0])
    # the images (8 x 3 x 64 x 64 float32, 393 KB) go through shared memory, the rest by value
    assert isinstance(packed["image"], torch.Tensor) and isinstance(packed["input_ids"], _Inline)
    assert all(isinstance(v, _Inline) for v in packed["meta"].values() if not isinstance(v, list))


def test_prefetch_thread_stops_mid_epoch_and_reraises_loader_errors():
    from lightning_clip.data.loader import _ThreadedIterator

    def boom():
        yield 1
        yield 2
        raise BadSampleError("bad sample in shard s.tar, key k1")

    it = _ThreadedIterator(boom())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(BadSampleError, match="s.tar, key k1"):
        next(it)
    endless = _ThreadedIterator(iter(range(10 ** 9)), depth=2)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # returns although the source never ends
    assert not endless._thread.is_alive()
    assert list(_ThreadedIterator(iter(range(5)))) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ no endless spin
def test_training_stream_with_no_sample_fails_naming_the_shards(tmp_path, tok):
    # one empty shard and one whose every sample is bad: a full pass yields nothing
    d = tmp_path / "barren"
    d.mkdir()
    _write(d / "e-000000.tar", {})
    _write(d / "e-000001.tar", {"k0": BAD["undecodable"][0], "k1": BAD["nocaption"][0]})
    from lightning_clip.data.stream import EmptyStreamError

    dm = ClipDataModule(str(d), str(d), batch_size=2, num_workers=0, epoch_length=4, tokenizer=tok)
    dm.setup("fit")
    with pytest.warns(DataWarning), pytest.raises(EmptyStreamError,
                                                  match=r"data.train_shards.*2 shard.*e-000000.tar.*e-000001.tar"):
        next(iter(dm.train_dataloader()))


def test_prefetch_thread_wait_ends_when_the_trainer_got_sigterm():
    import threading

    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from lightning_clip.data.loader import _ThreadedIterator

    never = threading.Event()

    def stuck():  # a loader that never delivers a batch
        never.wait()
        yield 1

    flag = {"sigterm": False}
    it = _ThreadedIterator(stuck(), stop_requested=lambda: flag["sigterm"])
    flag["sigterm"] = True
    with pytest.raises(SIGTERMException):
        next(it)
    never.set()


def test_validation_set_with_no_sample_fails_naming_the_shards(tmp_path, world, tok):
    from lightning_clip.data.stream import EmptyStreamError

    d = tmp_path / "emptyval"
    d.mkdir()
    _write(d / "v-000000.tar", {})
    _write(d / "v-000001.tar", {"k0": BAD["badjson"][0]})
    import warnings

    for workers in (0, 2):
        dm = ClipDataModule(str(world / "train"), str(d), batch_size=2, num_workers=workers, tokenizer=tok)
        dm.setup("validate")
        with warnings.catch_warnings(), pytest.raises(EmptyStreamError,
                                                      match=r"data.val_shards.*v-000000.tar.*v-000001.tar"):
            warnings.simplefilter("ignore", DataWarning)  # the bad sample's own warning (tested elsewhere)
            list(dm.val_dataloader())
        assert dm.skipped == 1


WRONG_TYPES = {
    "capstring": ({"all_captions": "a red square"}, "all_captions must be a list of strings, got str"),
    "capnumbers": ({"all_captions": ["a red square", 3]}, "all_captions must be a list of strings"),
    "captionlist": ({"caption": ["a red square"]}, "caption must be a string, got list"),
    "infostrings": ({"all_captions": ["a red square"], "captions": ["a red square"]},
                    "captions must be a list of objects"),
    "infolevel": ({"all_captions": ["a"], "captions": [{"level": "1", "constraints": {"objects": []}}]},
                  r"captions\[0\].level must be an integer"),
    "infolength": ({"all_captions": ["a", "b"], "captions": [{"level": 1, "constraints": {"objects": []}}]},
                   "captions has 1 entries for 2 all_captions"),
    "scenelist": ({"all_captions": ["a red square"], "scene": []}, "scene must be an object"),
}


@pytest.mark.parametrize("key", WRONG_TYPES)
def test_wrong_types_in_key_json_are_skipped_counted_or_raised(tmp_path, tok, key):
    meta, reason = WRONG_TYPES[key]
    _write(tmp_path / "s.tar", {"k0": {"jpg": None, "txt": b"a red square"},
                                key: {"jpg": None, "json": json.dumps(meta).encode()}})
    with pytest.warns(DataWarning, match=rf"s.tar, key {key}: wrong type in KEY.json: {reason}"):
        dm, keys = _read_all(tmp_path, tokenizer=tok)
    assert keys == ["k0#0"] and dm.skipped == 1
    with pytest.raises(BadSampleError, match=rf"s.tar, key {key}: wrong type in KEY.json: {reason}.*strict"):
        _read_all(tmp_path, tokenizer=tok, strict=True)


def test_a_cut_tar_counts_the_samples_it_lost(tmp_path, tok):
    good = {"jpg": None, "txt": b"a red square"}
    _write(tmp_path / "a-000000.tar", {f"w{i}": good for i in range(6)})
    _write(tmp_path / "a-000001.tar", {f"c{i}": good for i in range(6)})
    raw = (tmp_path / "a-000001.tar").read_bytes()
    per_sample = raw.index(b"c1.jpg") - raw.index(b"c0.jpg")  # header to header
    (tmp_path / "a-000001.tar").write_bytes(raw[:int(2.5 * per_sample)])  # half of it: c2 cut, c3..c5 gone
    # c0 is delivered; c1 is still being grouped when c2's member breaks off, so c1..c5 are lost: 5, not 1
    with pytest.warns(DataWarning, match=r"a-000001.tar, key c1: truncated.*read 1 sample\(s\).*lost 5"):
        dm, keys = _read_all(tmp_path, tokenizer=tok)
    assert len(keys) == 6 + 1 and dm.skipped == 5


def test_a_corrupt_header_counts_the_samples_after_it(tmp_path, tok):
    good = {"jpg": None, "txt": b"a red square"}
    _write(tmp_path / "s.tar", {f"k{i}": good for i in range(6)})
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    at = raw.index(b"k2.txt")
    raw[at:at + 6] = b"XXXXXX"  # k2.txt's header fails its checksum; k3..k5 are intact past it
    (tmp_path / "s.tar").write_bytes(bytes(raw))
    with pytest.warns(DataWarning, match=r"s.tar, key k2: truncated or corrupt.*lost 4.*3 found past the damage"):
        dm, keys = _read_all(tmp_path, tokenizer=tok)
    assert keys == ["k0#0", "k1#0"] and dm.skipped == 4


def test_caption_filters_that_allow_no_caption_fail_instead_of_spinning(tmp_path, tok):
    from lightning_clip.data.stream import EmptyStreamError

    meta = {"all_captions": ["a red thing"], "captions": [{"level": 1, "constraints": {"objects": [{"color": "red"}]}}],
            "scene": {"objects": []}}
    _write(tmp_path / "s.tar", {f"k{i}": {"jpg": None, "json": json.dumps(meta).encode()} for i in range(3)})
    kw = dict(batch_size=2, num_workers=0, epoch_length=4, tokenizer=tok, caption_levels=[4], image_size=16)
    dm = ClipDataModule(str(tmp_path), str(tmp_path), batching="caption", **kw)
    dm.setup("fit")
    with pytest.raises(EmptyStreamError, match=r"s.tar.*widen data.caption_levels=\[4\]"):
        next(iter(dm.train_dataloader()))
    # image batching falls back to every caption of the image: the same shards train
    dm = ClipDataModule(str(tmp_path), str(tmp_path), batching="image", **kw)
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))["meta"]["key"]) == 2
