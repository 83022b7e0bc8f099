"""Convert real image-caption datasets into img2dataset-layout shards.

Every converter writes ``KEY.jpg``, ``KEY.txt`` (the first caption) and ``KEY.json``
(``{"key", "caption", "all_captions", "source_image", "width", "height"}``) with
``webdataset.ShardWriter``, one sample per image with all of its captions. Shards written by img2dataset
itself need no conversion: `ClipDataModule` reads them as they are (a json without ``all_captions``
falls back to ``caption``, then to ``KEY.txt``).

Sources::

    python -m lightning_clip.data.convert flickr --images DIR --captions Flickr8k.token.txt \\
        [--split-list Flickr_8k.trainImages.txt] --out data/flickr8k/train
    python -m lightning_clip.data.convert coco --annotations captions_train2017.json --images train2017 --out ...
    python -m lightning_clip.data.convert csv --table pairs.tsv [--image-root DIR] --out ...

``--image-size N`` resizes (shorter side to N, centre crop) and re-encodes as JPEG; otherwise JPEG files
are copied byte for byte and other formats re-encoded. Missing or unreadable images are skipped with a
warning naming the file and counted in the final summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Optional

from PIL import Image

from lightning_clip.data.shards import DataWarning


def _encode_image(path: Path, image_size: Optional[int]) -> tuple[bytes, int, int]:
    raw = path.read_bytes()
    img = Image.open(io.BytesIO(raw))
    img.load()
    if image_size is None and img.format == "JPEG":
        return raw, img.width, img.height
    img = img.convert("RGB")
    if image_size is not None:
        scale = image_size / min(img.size)
        w, h = max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), img.width, img.height


def write_shards(pairs: Iterable[tuple[Path, list[str]]], out: str | os.PathLike, shard_size: int = 1000,
                 image_size: Optional[int] = None, prefix: str = "shard") -> dict:
    """Write ``(image path, [captions])`` pairs as ``out/<prefix>-%06d.tar``; returns a summary dict."""
    from webdataset import ShardWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, 0
    writer = ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0, encoder=False)
    try:
        for path, captions in pairs:
            captions = [c.strip() for c in captions if c and c.strip()]
            if not captions:
                warnings.warn(f"skipping {path}: no caption", DataWarning)
                skipped += 1
                continue
            try:
                data, w, h = _encode_image(Path(path), image_size)
            except (OSError, SyntaxError, ValueError) as e:
                warnings.warn(f"skipping {path}: {type(e).__name__}: {e}", DataWarning)
                skipped += 1
                continue
            key = f"{written:09d}"
            meta = {"key": key, "caption": captions[0], "all_captions": captions,
                    "source_image": Path(path).name, "width": w, "height": h}
            writer.write({"__key__": key, "jpg": data, "txt": captions[0].encode("utf-8"),
                          "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})
            written += 1
    finally:
        writer.close()
    summary = {"written": written, "skipped": skipped, "out": str(out)}
    if written == 0:
        # ShardWriter opened one empty shard; an empty tar would only confuse readers
        for f in out.glob(f"{prefix}-*.tar"):
            if f.stat().st_size <= 10240:
                f.unlink()
    return summary


def flickr_pairs(images: str | os.PathLike, captions_file: str | os.PathLike,
                 split_list: Optional[str | os.PathLike] = None) -> Iterator[tuple[Path, list[str]]]:
    """Flickr8k/30k: ``IMAGE#k<TAB>caption`` lines (``Flickr8k.token.txt``, ``results_20130124.token``),
    optionally restricted to the image names listed one per line in ``split_list``."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for n, line in enumerate(Path(captions_file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line or "#" not in line.split("\t", 1)[0]:
            raise ValueError(f"{captions_file}:{n}: expected 'IMAGE#k<TAB>caption', got {line[:80]!r}")
        name, caption = line.split("\t", 1)
        groups.setdefault(name.rsplit("#", 1)[0], []).append(caption)
    keep = None
    if split_list is not None:
        keep = {l.strip() for l in Path(split_list).read_text().splitlines() if l.strip()}
    for name, caps in groups.items():
        if keep is None or name in keep:
            yield Path(images) / name, caps


def coco_pairs(annotations: str | os.PathLike, images: str | os.PathLike) -> Iterator[tuple[Path, list[str]]]:
    """COCO captions JSON (``captions_train2017.json``): ``images[{id, file_name}]`` and
    ``annotations[{image_id, caption}]``; images in id order."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    for im in sorted(data["images"], key=lambda im: im["id"]):
        yield Path(images) / im["file_name"], caps.get(im["id"], [])


def table_pairs(table: str | os.PathLike, image_root: Optional[str | os.PathLike] = None,
                image_col: str = "image_path", caption_col: str = "caption") -> Iterator[tuple[Path, list[str]]]:
    """A CSV or TSV (by extension) with a header; rows sharing an image are merged into one sample.
    ``image_col`` falls back to img2dataset's ``url`` column when absent."""
    table = Path(table)
    delim = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
        col = image_col if image_col in cols else ("url" if "url" in cols else None)
        if col is None or caption_col not in cols:
            raise ValueError(f"{table}: needs columns {image_col!r} (or 'url') and {caption_col!r}; has {cols}")
        groups: "OrderedDict[str, list[str]]" = OrderedDict()
        for row in reader:
            groups.setdefault(row[col], []).append(row[caption_col] or "")
    root = Path(image_root) if image_root else table.parent
    for name, caps in groups.items():
        yield root / name, caps


def main(argv: Optional[Iterable[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lightning_clip.data.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    fl = sub.add_parser("flickr", help="Flickr8k/Flickr30k folder + token file")
    fl.add_argument("--images", required=True)
    fl.add_argument("--captions", required=True)
    fl.add_argument("--split-list")
    co = sub.add_parser("coco", help="COCO captions JSON + image folder")
    co.add_argument("--annotations", required=True)
    co.add_argument("--images", required=True)
    tb = sub.add_parser("csv", help="CSV/TSV of image_path, caption")
    tb.add_argument("--table", required=True)
    tb.add_argument("--image-root")
    tb.add_argument("--image-col", default="image_path")
    tb.add_argument("--caption-col", default="caption")
    for s in (fl, co, tb):
        s.add_argument("--out", required=True)
        s.add_argument("--shard-size", type=int, default=1000)
        s.add_argument("--image-size", type=int)
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.source == "flickr":
        pairs = flickr_pairs(a.images, a.captions, a.split_list)
    elif a.source == "coco":
        pairs = coco_pairs(a.annotations, a.images)
    else:
        pairs = table_pairs(a.table, a.image_root, a.image_col, a.caption_col)
    summary = write_shards(pairs, a.out, shard_size=a.shard_size, image_size=a.image_size)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
