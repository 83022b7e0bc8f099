"""Converters to img2dataset-layout shards, on tiny fixtures made here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_clip.data import convert
from lightning_clip.data.shards import DataWarning, SkipPolicy, expand_shards, iter_records


def _images(d: Path, names: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 200)).save(d / n)
    return d


def _by_source(out: Path) -> dict:
    recs = {}
    for shard in expand_shards(str(out)):
        for r in iter_records(shard, SkipPolicy(strict=True)):
            recs[r.key] = r
    return recs


def test_flickr_folder_with_split_list(tmp_path):
    imgs = _images(tmp_path / "Images", ["1.jpg", "2.jpg", "3.png"])
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("".join(f"{n}#{k}\t{n} caption {k}\n" for n in ("1.jpg", "2.jpg", "3.png") for k in range(2)))
    split = tmp_path / "trainImages.txt"
    split.write_text("1.jpg\n3.png\n")
    summary = convert.main(["flickr", "--images", str(imgs), "--captions", str(token), "--split-list", str(split),
                            "--out", str(tmp_path / "out"), "--image-size", "24"])
    assert summary["written"] == 2 and summary["skipped"] == 0
    recs = _by_source(tmp_path / "out")
    assert [r.captions for r in recs.values()] == [["1.jpg caption 0", "1.jpg caption 1"],
                                                   ["3.png caption 0", "3.png caption 1"]]
    assert all(r.image.shape == (3, 24, 24) and r.image.dtype == torch.uint8 for r in recs.values())


def test_flickr_token_file_format_is_checked(tmp_path):
    token = tmp_path / "t.txt"
    token.write_text("1.jpg a caption without the tab\n")
    with pytest.raises(ValueError, match=r"t.txt:1: expected 'IMAGE#k<TAB>caption'"):
        list(convert.flickr_pairs(tmp_path, token))


def test_coco_captions_json(tmp_path):
    imgs = _images(tmp_path / "train2017", ["000000000009.jpg", "000000000025.jpg"])
    ann = {"images": [{"id": 25, "file_name": "000000000025.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}],
           "annotations": [{"id": 1, "image_id": 9, "caption": "a plate of food"},
                           {"id": 2, "image_id": 25, "caption": "a giraffe"},
                           {"id": 3, "image_id": 9, "caption": "broccoli on a plate"}]}
    (tmp_path / "captions_train2017.json").write_text(json.dumps(ann))
    convert.main(["coco", "--annotations", str(tmp_path / "captions_train2017.json"), "--images", str(imgs),
                  "--out", str(tmp_path / "out"), "--shard-size", "1"])
    assert len(expand_shards(str(tmp_path / "out"))) == 2
    recs = list(_by_source(tmp_path / "out").values())
    assert [r.captions for r in recs] == [["a plate of food", "broccoli on a plate"], ["a giraffe"]]
    assert recs[0].image.shape == (3, 30, 40)  # JPEG copied as is without --image-size (H, W)


@pytest.mark.parametrize("sep, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_csv_and_tsv_tables_merge_rows_of_one_image(tmp_path, sep, suffix):
    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    table = tmp_path / f"pairs{suffix}"
    rows = [("image_path", "caption"), ("imgs/a.jpg", "first"), ("imgs/b.jpg", "other"), ("imgs/a.jpg", "second"),
            ("imgs/missing.jpg", "gone")]
    table.write_text("".join(sep.join(r) + "\n" for r in rows))
    with pytest.warns(DataWarning, match="missing.jpg"):
        summary = convert.main(["csv", "--table", str(table), "--out", str(tmp_path / "out")])
    assert summary == {"written": 2, "skipped": 1, "out": str(tmp_path / "out")}
    assert [r.captions for r in _by_source(tmp_path / "out").values()] == [["first", "second"], ["other"]]


def test_table_without_the_columns_names_them(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,text\nx.jpg,hi\n")
    with pytest.raises(ValueError, match="needs columns 'image_path' \\(or 'url'\\) and 'caption'"):
        list(convert.table_pairs(table))


def test_images_torchvision_cannot_decode_fall_back_to_pil(tmp_path):
    """decode_image tries torchvision first; a format it rejects (TIFF) is decoded by PIL, same pixels."""
    import io

    from lightning_clip.data.shards import decode

    img = Image.new("RGB", (5, 3))
    img.putdata([(10 * i, 255 - 10 * i, 7 * i) for i in range(15)])
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    rec = decode("s.tar", "k", {"jpg": buf.getvalue(), "txt": b"a caption"}, SkipPolicy(strict=True))
    assert rec.image.dtype == torch.uint8 and rec.image.shape == (3, 3, 5)
    assert rec.image[:, 1, 2].tolist() == [70, 185, 49]  # pixel index 7 (row 1, column 2)
    with pytest.raises(Exception, match="undecodable image KEY.jpg"):
        decode("s.tar", "k", {"jpg": b"not an image", "txt": b"a caption"}, SkipPolicy(strict=True))
