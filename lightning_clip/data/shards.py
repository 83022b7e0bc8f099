"""Reading img2dataset-layout shards (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``) robustly.

`expand_shards` turns a directory, a glob or a brace pattern into a sorted list of tar files and fails
with the pattern in the message when nothing matches. URLs (``https://``, ``pipe:``...) are passed
through and opened with webdataset's ``gopen``.

`iter_records` reads one shard into `Record`s. It is a small tar loop rather than
``webdataset.tarfile_to_samples`` because every bad input must be reported with its shard *and* key,
and webdataset's exception handlers do not receive the member being read. Bad inputs (an undecodable
image, a missing caption, malformed JSON, a truncated tar) go to a `SkipPolicy`: a warning naming shard
and key plus a count, or with ``strict`` an error.
"""
from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_clip.data.synthetic import stable_id

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# KEY.ext with the key up to the first dot of the file name (webdataset's convention)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DataWarning(UserWarning):
    """A sample was skipped (the message names shard and key)."""


class BadSampleError(RuntimeError):
    """Raised for the first bad sample when ``strict=True`` (the message names shard and key)."""


def expand_shards(pattern: str, option: str = "shards") -> list[str]:
    """A directory of ``.tar`` files, a glob, a brace pattern (``dir/shard-{000000..000007}.tar``) or
    several of those joined by ``::``, as a sorted list of existing files."""
    from webdataset.shardlists import expand_urls

    files: list[str] = []
    for part in expand_urls(str(pattern)):
        if _is_remote(part):
            files.append(part)  # opened with webdataset's gopen (curl, pipe:, s3 ...); not checked here
        elif os.path.isdir(part):
            files.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        elif any(c in part for c in "*?["):
            files.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            files.append(part)
    if not files:
        raise FileNotFoundError(f"data.{option}={pattern!r} matches no shard (expected a directory of .tar "
                                f"files, a glob, or a brace pattern like dir/shard-{{000000..000007}}.tar)")
    return sorted(dict.fromkeys(files))


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") or url.startswith("pipe:")


def _open(shard: str):
    if _is_remote(shard):
        from webdataset.gopen import gopen

        return gopen(shard, "rb")
    return open(shard.removeprefix("file://"), "rb")


class SkipPolicy:
    """Counts skipped samples across DataLoader worker processes, warns, or raises when strict.

    The counter is a ``multiprocessing.Value`` created in the main process; workers inherit it (fork) or
    receive it while being started (spawn), so increments made in workers are visible to the trainer.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._count = multiprocessing.get_context().Value("q", 0)

    @property
    def count(self) -> int:
        return int(self._count.value)

    def __call__(self, shard: str, key: str, reason: str) -> None:
        msg = f"bad sample in shard {shard}, key {key}: {reason}"
        if self.strict:
            raise BadSampleError(msg + " (data.strict=true)")
        with self._count.get_lock():
            self._count.value += 1
        warnings.warn("skipping " + msg, DataWarning, stacklevel=2)


@dataclass
class Record:
    """One decoded sample: the image and every caption, plus optional synthetic ground truth."""

    shard: str
    key: str
    image: torch.Tensor  # uint8 [3, H, W], RGB
    captions: list[str]
    image_id: int
    group: int
    scene: Optional[dict] = None
    caption_info: Optional[list[dict]] = None  # per caption: level, constraints (synthetic only)


def _tar_members(shard: str, on_bad: SkipPolicy) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (``KEY.ext``) -> (key, {ext: bytes})."""
    key, files = None, {}
    last = "<start of archive>"
    try:
        with _open(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                last = info.name
                m = _KEY_EXT.match(info.name)
                if not info.isreg() or m is None:
                    continue
                base, ext = m.groups()
                data = tar.extractfile(info).read()
                if base != key:
                    if key is not None:
                        yield key, files
                    key, files = base, {}
                files[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated or corrupt archive: the sample being read is lost; the ones before were yielded.
        on_bad(shard, (key or last), f"truncated or corrupt tar after member {last!r} ({e})")
        return
    if key is not None:
        yield key, files


def decode(shard: str, key: str, files: dict[str, bytes], on_bad: SkipPolicy) -> Optional[Record]:
    """Turn the raw files of one key into a `Record`, or report it to ``on_bad`` and return None."""
    img_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if img_ext is None:
        on_bad(shard, key, f"no image (files: {sorted(files)})")
        return None
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
        except ValueError as e:
            on_bad(shard, key, f"malformed JSON ({e})")
            return None
    captions = meta.get("all_captions")
    if not captions:
        cap = meta.get("caption")
        if not cap and "txt" in files:
            cap = files["txt"].decode("utf-8", errors="replace")
        captions = [cap] if cap else []
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        on_bad(shard, key, "missing caption (no KEY.txt and no caption/all_captions in KEY.json)")
        return None
    raw = files[img_ext]
    try:
        image = decode_image(raw)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        on_bad(shard, key, f"undecodable image KEY.{img_ext} ({type(e).__name__}: {e})")
        return None
    image_id = meta.get("image_id")
    if not isinstance(image_id, int):
        # Real data: one id per source image (img2dataset records the source name or URL).
        source = meta.get("source_image") or meta.get("url") or f"{Path(shard).name}/{key}"
        image_id = stable_id(str(source))
    group = meta.get("group")
    if not isinstance(group, int):
        # Byte-identical photos (Flickr8k has a pair) become positives of each other's captions.
        group = stable_id("bytes:" + (meta.get("sha256") or __import__("hashlib").sha256(raw).hexdigest()))
    info = meta.get("captions")
    if not (isinstance(info, list) and len(info) == len(captions)):
        info = None
    return Record(shard=shard, key=key, image=image, captions=captions, image_id=image_id, group=group,
                  scene=meta.get("scene"), caption_info=info)


def decode_image(raw: bytes) -> torch.Tensor:
    """Encoded image -> uint8 RGB tensor ``[3, H, W]``; raises on corrupt or truncated data.

    torchvision's libjpeg-turbo/libpng decoders go straight to a tensor: 0.050 ms for a 64 px JPEG against
    0.118 ms through PIL plus the PIL-to-tensor copy, same pixels (benchmarks/data_throughput.py). Formats or files it rejects get a
    second chance through PIL, so PIL's error is the one reported for a corrupt file."""
    try:
        return tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return pil_to_tensor(Image.open(io.BytesIO(raw)).convert("RGB"))  # convert forces the full decode


def iter_records(shard: str, on_bad: SkipPolicy) -> Iterator[Record]:
    for key, files in _tar_members(shard, on_bad):
        rec = decode(shard, key, files, on_bad)
        if rec is not None:
            yield rec


def iter_captions(shards: list[str]) -> Iterator[str]:
    """Every caption of every sample (to train a tokenizer). Bad samples are passed over silently
    here: they are reported and counted when the samples themselves are read."""
    for shard in shards:
        for key, files in _tar_members(shard, lambda *a: None):
            try:
                meta = json.loads(files["json"]) if "json" in files else {}
                caps = meta.get("all_captions") or [meta.get("caption") or files.get("txt", b"").decode()]
            except (ValueError, AttributeError, UnicodeDecodeError):
                continue
            yield from (c for c in caps if isinstance(c, str) and c.strip())
