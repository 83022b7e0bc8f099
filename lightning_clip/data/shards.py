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

import functools
import glob
import io
import json
import multiprocessing
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_clip.data.synthetic import stable_id
from lightning_clip.data.tar import content_size, members, names_after

try:  # a declared dependency; the fallback keeps a hand-made environment working
    from orjson import loads as _json_loads  # several times faster than json on a KEY.json
except ImportError:  # pragma: no cover
    _json_loads = json.loads

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# KEY.ext with the key up to the first dot of the file name (webdataset's convention)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DataWarning(UserWarning):
    """A sample was skipped (the message names shard and key)."""


class BadSampleError(RuntimeError):
    """Raised for the first bad sample when ``strict=True`` (the message names shard and key)."""


class ShardsNotFound(FileNotFoundError):
    """A shard option names files that are not there (the message names the option and the files)."""


def expand_shards(pattern: str, option: str = "shards") -> list[str]:
    """A directory of ``.tar`` files, a glob, a brace pattern (``dir/shard-{000000..000007}.tar``) or
    several of those joined by ``::``, as a sorted list of existing files."""
    from webdataset.shardlists import expand_urls

    files: list[str] = []
    missing: list[str] = []
    for part in expand_urls(str(pattern)):
        if _is_remote(part):
            files.append(part)  # opened with webdataset's gopen (curl, pipe:, s3 ...); not checked here
        elif os.path.isdir(part):
            files.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        elif any(c in part for c in "*?["):
            files.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            files.append(part)
        else:
            missing.append(part)
    if not files:
        raise ShardsNotFound(
            f"data.{option}={pattern!r} matches no shard (expected a directory of .tar files, a glob, or a "
            f"brace pattern like dir/shard-{{000000..000007}}.tar). Check the path; to build shards: real "
            f"photographs with `python -m lightning_clip.data.convert flickr|coco ... --out ROOT` (see "
            f"data/README.md), the synthetic world with `make data` or `python -m lightning_clip.data.synthetic "
            f"--out ROOT`, then point data.train_shards/data.val_shards at ROOT/train and ROOT/val")
    if missing:
        # a pattern that names its files (a brace range, a list) is a promise: training on the part of it
        # that is there would quietly change the data
        raise ShardsNotFound(
            f"data.{option}={pattern!r} names {len(missing)} shard(s) that do not exist ({', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}) beside {len(files)} that do; fix the "
            f"pattern or restore the missing files (a glob such as dir/shard-*.tar takes whatever is there)")
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

    def restore(self, count: int) -> None:
        """Continue from a resumed run's count (before any worker starts)."""
        with self._count.get_lock():
            self._count.value = count

    def __call__(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        """Report a bad sample; ``count`` > 1 when one damage loses several (a truncated tar)."""
        msg = f"bad sample in shard {shard}, key {key}: {reason}"
        if self.strict:
            raise BadSampleError(msg + " (data.strict=true)")
        with self._count.get_lock():
            self._count.value += max(1, count)
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
    #: (the scene's, each caption's) object bitsets for the relevance oracle, made on a batch's first use of
    #: the record (`lightning_clip.data.batching.oracle_bits`): a cached record's repeat costs none of it
    oracle_bits: Optional[tuple] = field(default=None, repr=False, compare=False)


def _tell(stream) -> Optional[int]:
    try:
        return stream.tell()
    except (AttributeError, OSError, ValueError):
        return None


def _keys_after(shard: str, start: int) -> set[str]:
    """Keys of the samples whose member headers a local ``shard`` still holds from byte ``start`` on:
    the samples a corrupt header in the middle cut off from the reader."""
    names = names_after(shard.removeprefix("file://"), start)
    return {m.group(1) for m in map(_KEY_EXT.match, names) if m}


def _missing_tail(shard: str, size: int, complete: int, complete_bytes: int) -> int:
    """Samples a cut ``shard`` (``size`` bytes) no longer holds beyond the one being read, estimated from
    its sibling shards' median size and the bytes per sample of the ``complete`` samples read before the
    cut (``complete_bytes``); 0 when there is nothing to estimate from."""
    if complete < 1 or complete_bytes <= 0:
        return 0
    median = _median_sibling_size(shard.removeprefix("file://"))
    if median is None or median <= size:
        return 0
    return max(0, round(median / (complete_bytes / complete)) - complete - 1)


@functools.lru_cache(maxsize=64)
def _median_sibling_size(path: str) -> Optional[int]:
    """Median content size of the other shards in ``path``'s folder; cached, because training rereads a
    damaged shard (drawn with replacement) and would otherwise stat and read every sibling each time."""
    here = Path(path)
    try:
        sizes = sorted(content_size(p) for p in here.parent.glob("*.tar") if p != here)
    except OSError:
        return None
    return sizes[len(sizes) // 2] if sizes else None


def _tar_members(shard: str, on_bad: SkipPolicy) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (``KEY.ext``) -> (key, {ext: bytes})."""
    key, files = None, {}
    seen: set[str] = set()  # keys already yielded: a key must name one sample of a shard
    last = "<start of archive>"
    complete, complete_bytes, end = 0, 0, 0  # samples before the one in progress, their bytes
    at = None  # where the reader stopped, for a damaged local file
    try:
        with _open(shard) as stream:
            try:
                for name, data in members(stream):
                    last = name
                    m = _KEY_EXT.match(name)
                    if m is None:
                        continue
                    base, ext = m.groups()
                    if base != key:
                        if key is not None:
                            complete, complete_bytes = complete + 1, end
                            if key in seen:
                                on_bad(shard, key, "duplicate key: a sample of this key came earlier in the shard")
                            else:
                                seen.add(key)
                                yield key, files
                        key, files = base, {}
                    elif ext.lower() in files:
                        on_bad(shard, key, f"duplicate member {name!r} in the shard (the first is kept)")
                        continue
                    files[ext.lower()] = data
                    end = _tell(stream) or 0
            except (tarfile.TarError, OSError, EOFError, ValueError):
                at = _tell(stream)
                raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # A truncated or corrupt archive: the sample being read is lost, and so is everything after the
        # damage. Count those too (data/skipped must show the scale, not one per damaged read): samples
        # whose headers are still in the file past a corrupt block, exactly; samples a cut file no longer
        # holds, estimated from the sibling shards' size.
        reason = f"truncated or corrupt tar after member {last!r} ({e})"
        lost = 1
        if at is not None and not _is_remote(shard):
            size = os.path.getsize(shard.removeprefix("file://"))
            after = _keys_after(shard, at) - {key}
            missing = _missing_tail(shard, size, complete, complete_bytes) if at >= size else 0
            lost += len(after) + missing
            reason += (f"; read {complete} sample(s) up to byte {at} of {size}, lost {lost}: the one being read"
                       + (f", {len(after)} found past the damage" if after else "")
                       + (f", ~{missing} more a shard of its siblings' median size would hold" if missing else ""))
        on_bad(shard, (key or last), reason, count=lost)
        return
    if key is not None:
        if key in seen:
            on_bad(shard, key, "duplicate key: a sample of this key came earlier in the shard")
        else:
            yield key, files


def _kind(v) -> str:
    return type(v).__name__


def _schema_problem(meta: dict) -> Optional[str]:
    """What is wrong with the types of KEY.json's fields, or None. Every field is optional, but one that
    is present must have its type: a string ``all_captions`` would otherwise be trained on character by
    character, and a malformed ``captions``/``scene`` would crash the collate or the oracle later."""
    caps = meta.get("all_captions")
    if caps is not None and not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
        return f"all_captions must be a list of strings, got {_kind(caps)}" + (
            f" holding {sorted({_kind(c) for c in caps if not isinstance(c, str)})}" if isinstance(caps, list) else "")
    if meta.get("caption") is not None and not isinstance(meta["caption"], str):
        return f"caption must be a string, got {_kind(meta['caption'])}"
    info = meta.get("captions")
    if info is not None:
        if not (isinstance(info, list) and all(isinstance(c, dict) for c in info)):
            return f"captions must be a list of objects (level, constraints), got {_kind(info)}" + (
                f" holding {sorted({_kind(c) for c in info if not isinstance(c, dict)})}" if isinstance(info, list) else "")
        for i, c in enumerate(info):
            if not isinstance(c.get("level"), int) or isinstance(c.get("level"), bool):
                return f"captions[{i}].level must be an integer, got {_kind(c.get('level'))}"
            cons = c.get("constraints")
            if not (isinstance(cons, dict) and isinstance(cons.get("objects"), list)):
                return f"captions[{i}].constraints must be an object with an objects list"
        if isinstance(caps, list) and len(info) != len(caps):
            return f"captions has {len(info)} entries for {len(caps)} all_captions"
    scene = meta.get("scene")
    if scene is not None and not (isinstance(scene, dict) and isinstance(scene.get("objects"), list)):
        return f"scene must be an object with an objects list, got {_kind(scene)}"
    return None


def decode(shard: str, key: str, files: dict[str, bytes], on_bad: SkipPolicy) -> Optional[Record]:
    """Turn the raw files of one key into a `Record`, or report it to ``on_bad`` and return None."""
    img_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if img_ext is None:
        on_bad(shard, key, f"no image (files: {sorted(files)})")
        return None
    meta = {}
    if "json" in files:
        try:
            meta = _json_loads(files["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
        except ValueError as e:
            on_bad(shard, key, f"malformed JSON ({e})")
            return None
    problem = _schema_problem(meta)
    if problem:
        on_bad(shard, key, f"wrong type in KEY.json: {problem}")
        return None
    captions = meta.get("all_captions")
    info = meta.get("captions")
    if not captions:
        cap = meta.get("caption")
        if not cap and "txt" in files:
            cap = files["txt"].decode("utf-8", errors="replace")
        captions = [cap] if cap else []
    kept = [k for k, c in enumerate(captions) if isinstance(c, str) and c.strip()]
    if 0 < len(kept) < len(captions):
        # the sample stays, less its empty captions; their ground truth goes with them, so the rest keep
        # theirs (semantic recall and the ceiling need every caption's)
        warnings.warn(f"dropping {len(captions) - len(kept)} empty caption(s) of {len(captions)} in shard {shard}, "
                      f"key {key}", DataWarning, stacklevel=2)
        if isinstance(info, list) and len(info) == len(captions):
            info = [info[k] for k in kept]
    captions = [captions[k].strip() for k in kept]
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
    if not (isinstance(info, list) and len(info) == len(captions)):
        info = None
    return Record(shard=shard, key=key, image=image, captions=captions, image_id=image_id, group=group,
                  scene=meta.get("scene"), caption_info=info)


def decode_image(raw: bytes) -> torch.Tensor:
    """Encoded image -> uint8 RGB tensor ``[3, H, W]``; raises on corrupt or truncated data.

    torchvision's libjpeg-turbo/libpng decoders go straight to a tensor, faster than PIL plus the
    PIL-to-tensor copy and with the same pixels (benchmarks/data_throughput.py compares them). Formats or
    files it rejects get a second chance through PIL, so PIL's error is the one reported for a corrupt
    file."""
    try:
        image = tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return pil_to_tensor(Image.open(io.BytesIO(raw)).convert("RGB"))  # convert forces the full decode
    if image.dtype == torch.uint16:  # a 16-bit PNG: its top 8 bits, as PIL's conversion to RGB keeps
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"decoded to {image.dtype}, expected 8 or 16 bits per channel")
    return image


def iter_records(shard: str, on_bad: SkipPolicy) -> Iterator[Record]:
    for key, files in _tar_members(shard, on_bad):
        rec = decode(shard, key, files, on_bad)
        if rec is not None:
            yield rec


def iter_captions(shards: list[str]) -> Iterator[str]:
    """Every caption of every sample (to train a tokenizer). Bad samples are passed over silently
    here: they are reported and counted when the samples themselves are read."""
    for shard in shards:
        for key, files in _tar_members(shard, lambda *a, **k: None):
            try:
                meta = json.loads(files["json"]) if "json" in files else {}
                caps = meta.get("all_captions") or [meta.get("caption") or files.get("txt", b"").decode()]
            except (ValueError, AttributeError, UnicodeDecodeError):
                continue
            yield from (c for c in caps if isinstance(c, str) and c.strip())
