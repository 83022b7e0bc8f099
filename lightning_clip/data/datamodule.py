"""`ClipDataModule`: streams image-caption shards into the project's batch dict.

Training is resampled and infinite (shards drawn with replacement, a sample shuffle buffer, one caption
drawn per visit) and cut into epochs of ``epoch_length`` samples. Validation is deterministic: every
caption of every image, one item per (image, caption) pair, in shard order, shards split across nodes
and DataLoader workers without duplication or loss.

Decoding, transforms, tokenisation and collation all happen in the workers; the loader receives whole
batches (``batch_size=None``), which keeps inter-process traffic to one message per batch.

Skipped samples (see `lightning_clip.data.shards`) are counted in a counter shared with the workers:
``datamodule.skipped`` is the running total for this process (train and val), which the module logs as
``data/skipped``.
"""
from __future__ import annotations

import math
import os
import queue
import random
import threading
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_clip.data.shards import Record, SkipPolicy, expand_shards, iter_captions, iter_records
from lightning_clip.data.synthetic import object_bits, relevance_from_bits
from lightning_clip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from lightning_clip.models.tokenizer import CaptionEncoder

BATCHING_MODES = ("image", "caption")
# Items per training epoch: the size of the synthetic training set. Each epoch restarts the workers'
# streams, and the first batch then waits for the shuffle buffer to refill, so epochs are kept long.
EPOCH_LENGTH = 20000
#: the synthetic world's caption specificity levels (`lightning_clip.data.synthetic.LEVEL_ATTRIBUTES`)
CAPTION_LEVELS = (1, 2, 3, 4)
CAPTION_OBJECTS = (1, 2, 3)  # a caption describes 1..MAX_OBJECTS objects of its scene
# Where `data.generate` may build the synthetic world when its options name no root: base.yaml's shards
# (and `make data`'s output). Shards pointed anywhere else are never generated.
DEFAULT_GENERATE_ROOT = "data/synthetic48"


class EmptyStreamError(RuntimeError):
    """A full pass over the shards yielded no sample (every shard empty, or every sample skipped)."""


def _no_sample_message(shards: list[str], option: str) -> str:
    names = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
    return (f"{option}: a full pass over its {len(shards)} shard(s) ({names}) yielded no sample: every shard "
            "is empty or every sample in it was skipped as bad (see the DataWarnings above, or rerun with "
            "data.strict=true to stop at the first); point the option at valid shards")


def collate(items: list[tuple[Record, int, torch.Tensor]], tokenizer, max_length: int,
            ground_truth: bool = True, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """(record, caption index, image tensor) items -> the batch dict of CONTRACTS.md.

    ``tokenizer`` is a tokenizer or a `CaptionEncoder` (which memoises each caption's row). With
    ``normalize`` (`ImageTransform.normalize`) the items' images are uint8 and are normalised here, once
    per batch; without it they are used as they are.

    ``ground_truth=False`` (training batches) leaves out ``scene`` and ``constraints``: only validation's
    semantic recall reads them, and 64 nested dicts per batch cost ~5 ms of every training step (pickled
    out of the worker, then walked by Lightning's device transfer) for nothing.

    When every item has synthetic ground truth (train and val alike), ``meta["relevance"]`` is the
    oracle's bool ``[B images, B captions]`` matrix: entry (i, j) says caption j is true of image i (the
    diagonal always is). ~0.2 ms per batch of 64, in the worker. Real data gets no such key.
    """
    captions = [r.captions[k] for r, k, _ in items]
    encode = tokenizer if isinstance(tokenizer, CaptionEncoder) else CaptionEncoder(tokenizer, max_length)
    input_ids, attention_mask = encode(captions)
    # NHWC, the layout the image tower runs in (model.channels_last), made here in the loader worker
    # instead of in the training loop (0.5 ms of its step); values are the same in either layout
    images = torch.stack([x for _, _, x in items]).contiguous(memory_format=torch.channels_last)
    info = [r.caption_info[k] if r.caption_info else None for r, k, _ in items]
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = {
        "image": images if normalize is None else normalize(images),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "meta": {
            "key": [f"{r.key}#{k}" for r, k, _ in items],
            "caption": captions,
            "image_id": long([r.image_id for r, _, _ in items]),
            # one group per image: its captions and any identical image/scene share it
            "image_group": long([r.group for r, _, _ in items]),
            "text_group": long([r.group for r, _, _ in items]),
            "specificity": long([c["level"] if c else -1 for c in info]),
            "num_objects": long([len(r.scene["objects"]) if r.scene else -1 for r, _, _ in items]),
        },
    }
    if all(r.scene is not None and c is not None for (r, _, _), c in zip(items, info)):
        # relevance_from_bits is [captions, images]; the batch holds [images, captions]
        bits = [oracle_bits(r) for r, _, _ in items]
        rel = relevance_from_bits([b[1][k] for b, (_, k, _) in zip(bits, items)], [b[0] for b in bits]).T.contiguous()
        batch["meta"]["relevance"] = rel
        n = rel.shape[0]
        if n > 1:
            # the share of off-diagonal pairs the oracle accepts (the training loop's false-negative
            # count): 0.4 ms of Python and small ops in the training step, free here in the worker
            off = int(rel.sum()) - int(rel.diagonal().sum())
            batch["meta"]["false_negative_share"] = torch.tensor(off / (n * (n - 1)), dtype=torch.float64)
    if ground_truth:
        batch["meta"]["scene"] = [r.scene for r, _, _ in items]
        batch["meta"]["constraints"] = [c["constraints"] if c else None for c in info]
    return batch


def oracle_bits(r: Record) -> tuple[list[int], list[list[int]]]:
    """``r``'s scene and each of its captions' constraints as the oracle's object bitsets
    (`lightning_clip.data.synthetic.relevance_from_bits`), computed once per record: the per-object
    Python was two thirds of a training batch's relevance matrix, made for every batch in the worker."""
    if r.oracle_bits is None:
        r.oracle_bits = (object_bits(r.scene, "scene"),
                         [object_bits(c["constraints"], "constraints", k) for k, c in enumerate(r.caption_info)])
    return r.oracle_bits


class ShardStream(IterableDataset):
    """Yields collated batches; the split logic depends on ``train``.

    ``rank``/``world_size`` are fixed in the main process at setup; the worker id is read in the worker.
    """

    def __init__(self, shards: list[str], *, train: bool, batch_size: int, transform: ImageTransform,
                 tokenizer, max_length: int, on_bad: SkipPolicy, batching: str = "image",
                 shuffle_buffer: int = 1000, epoch_length: int = EPOCH_LENGTH, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, caption_levels: Optional[tuple[int, ...]] = None,
                 caption_objects: Optional[tuple[int, ...]] = None, cache_records: int = 0):
        super().__init__()
        self.caption_levels = None if caption_levels is None else frozenset(caption_levels)
        self.caption_objects = None if caption_objects is None else frozenset(caption_objects)
        self.shards, self.train, self.batch_size = shards, train, batch_size
        self.transform, self.max_length, self.on_bad = transform, max_length, on_bad
        self.encoder = CaptionEncoder(tokenizer, max_length)  # the tokenizer, memoised per caption
        # decoded records of whole shards read without a problem, kept by the (persistent) worker: later
        # passes over a shard skip the tar, JSON and JPEG decoding (see `ClipDataModule`'s cache_records)
        self.cache_records, self._cache, self._cached = cache_records, {}, 0
        self.batching, self.shuffle_buffer, self.epoch_length, self.seed = batching, shuffle_buffer, epoch_length, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 0)
        self.epoch = 0   # set by the loader in the main process before each pass
        self._passes = 0  # passes made by this copy (persistent workers keep their copy)
        self._skip = 0    # batches of the next pass already trained on before a resume (see `resume_at`)

    def resume_at(self, passes: int, batches: int) -> None:
        """Make the next pass continue pass ``passes`` (0-based) after its first ``batches`` batches, as
        an uninterrupted run would (call before the workers start: they copy this state)."""
        self._passes, self._skip = passes, batches

    def batches_per_worker(self) -> int:
        return max(1, math.ceil(self.epoch_length / (self.batch_size * self.world_size * max(1, self.num_workers))))

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("the validation stream has no fixed length")
        return self.batches_per_worker() * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        batches = self._iter_batches(info)
        # in a worker process, the small tensors travel inside the pickle (`_Inline`)
        return map(_pack, batches) if info is not None else batches

    def _iter_batches(self, info) -> Iterator[dict]:
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self._passes += 1
        if self.train:
            skip, self._skip = self._skip, 0
            # The loader takes batches from its workers round-robin, starting at worker 0; after a resume
            # the uninterrupted run's next batch is that of worker skip % workers, so the workers take
            # over the streams (seed and position) of the ones they stand in for.
            role = (worker + skip) % workers
            done = len(range(role, skip, workers))  # batches of this stream among the first `skip`
            rng = random.Random(hash((self.seed, self.rank, role, self.epoch, self._passes)))
            items = islice(self._train_items(rng), done * self.batch_size, None)
            yield from islice(self._batches(items, partial=False), max(0, self.batches_per_worker() - done))
        else:
            # Node split first, then worker split, both over shards: deterministic, no loss, no duplication.
            mine = self.shards[self.rank::self.world_size][worker::workers]
            yield from self._batches(self._val_items(mine), partial=True)

    # ------------------------------------------------------------------------------------ items
    def _records(self, shards) -> Iterator[Record]:
        for shard in shards:
            yield from iter_records(shard, self.on_bad)

    def _allowed(self, r: Record) -> Optional[list[int]]:
        """Indices of ``r``'s captions at ``caption_levels`` describing ``caption_objects`` objects (None:
        no filter)."""
        if self.caption_levels is None and self.caption_objects is None:
            return None
        if not r.caption_info:
            option = (f"data.caption_levels={sorted(self.caption_levels)}" if self.caption_levels is not None
                      else f"data.caption_objects={sorted(self.caption_objects)}")
            raise ValueError(f"{option} needs caption specificity levels (synthetic data); sample {r.key!r} "
                             f"of {r.shard} has none")
        levels, objects = self.caption_levels, self.caption_objects
        return [k for k, c in enumerate(r.caption_info)
                if (levels is None or c["level"] in levels)
                and (objects is None or len(c["constraints"]["objects"]) in objects)]

    def _usable(self, r: Record) -> bool:
        """Whether ``r`` gives a training item: caption batching emits nothing for an image with no
        caption at the chosen levels/object counts (image batching falls back to all of its captions)."""
        return self.batching == "image" or self._allowed(r) != []

    def _resampled_records(self, rng: random.Random) -> Iterator[Record]:
        """Records of shards drawn with replacement, forever; raises `EmptyStreamError` once every shard
        has been read since the last usable record without yielding one (all empty, every sample bad,
        or no caption passing the caption filters), which would otherwise spin at 100% CPU with zero
        steps."""
        barren: set[str] = set()  # shards read since the last usable record that gave none
        while True:
            shard = self.shards[rng.randrange(len(self.shards))]
            found = False
            for r in self._shard_records(shard):
                found = found or self._usable(r)
                yield r
            if found:
                barren.clear()
                continue
            barren.add(shard)
            if len(barren) == len(set(self.shards)):
                msg = _no_sample_message(self.shards, "data.train_shards")
                if self.caption_levels is not None or self.caption_objects is not None:
                    msg += (f", or widen data.caption_levels={sorted(self.caption_levels or []) or None} / "
                            f"data.caption_objects={sorted(self.caption_objects or []) or None}: with "
                            "data.batching=caption no image has a caption they allow")
                raise EmptyStreamError(msg)

    def _shard_records(self, shard: str) -> Iterator[Record]:
        """``iter_records(shard)``, from the record cache when the shard is in it. A shard is kept only
        when it was read to its end without a bad sample (so skip counts and warnings repeat on every
        read exactly as without the cache) and only while the cache has room for all of it."""
        if shard in self._cache:
            yield from self._cache[shard]
            return
        problems = 0

        def on_bad(*args, **kwargs):
            nonlocal problems
            problems += 1
            self.on_bad(*args, **kwargs)

        kept: Optional[list[Record]] = [] if self._cached < self.cache_records else None
        for r in iter_records(shard, on_bad):
            if kept is not None:
                kept.append(r)
            yield r
        if kept is not None and not problems and self._cached + len(kept) <= self.cache_records:
            self._cache[shard], self._cached = kept, self._cached + len(kept)

    def _train_items(self, rng: random.Random):
        import webdataset as wds

        records = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(
            self._resampled_records(rng)) if self.shuffle_buffer > 1 else self._resampled_records(rng)
        if self.batching == "image":
            for r in records:
                # an image with no caption at the chosen levels falls back to all of its captions
                ks = self._allowed(r) or None
                k = rng.randrange(len(r.captions)) if ks is None else ks[rng.randrange(len(ks))]
                yield r, k, self.transform.geometry_only(r.image)
        else:
            # every caption of an image, kept close together so that the image repeats within a batch;
            # a batch-sized buffer mixes their positions
            def expanded():
                for r in records:
                    ks = self._allowed(r)
                    if ks is None:
                        ks = range(len(r.captions))
                    elif not ks:
                        continue  # only the captions at the chosen levels are emitted
                    x = self.transform.geometry_only(r.image)
                    for k in ks:
                        yield r, k, x
            yield from wds.shuffle(self.batch_size, initial=self.batch_size, rng=rng)(expanded())

    def _val_items(self, shards):
        for r in self._records(shards):
            x = self.transform.geometry_only(r.image)
            for k in range(len(r.captions)):
                yield r, k, x

    def _batches(self, items, partial: bool) -> Iterator[dict]:
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch_size:
                yield collate(buf, self.encoder, self.max_length, ground_truth=not self.train,
                              normalize=self.transform.normalize)
                buf = []
        if buf and partial:
            yield collate(buf, self.encoder, self.max_length, ground_truth=not self.train,
                          normalize=self.transform.normalize)


# Tensors up to this size leave a loader worker by value, pickled as numpy arrays (see `_Inline`).
INLINE_BYTES = 1 << 16


class _Inline:
    """A small tensor that crosses from a loader worker to the main process inside the pickle.

    A tensor pickled by a worker goes through shared memory: the worker's resource-sharer thread passes
    one file descriptor per tensor over a socket and the receiver maps it, ~0.1 ms of Python and system
    calls on each side per tensor. A batch holds one large tensor (the images) and nine small ones (token
    ids, mask, the meta ids, the relevance matrix): sending the small ones by value leaves one descriptor
    per batch. The values are the same (`torch.from_numpy` of the unpickled array)."""

    __slots__ = ("array",)

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()


def _pack(batch: dict) -> dict:
    """In a worker: the batch's small tensors (and its meta's) become `_Inline`."""
    def small(v) -> bool:
        return isinstance(v, torch.Tensor) and v.element_size() * v.numel() <= INLINE_BYTES and v.device.type == "cpu"

    out = {k: _Inline(v) if small(v) else v for k, v in batch.items()}
    if isinstance(batch.get("meta"), dict):
        out["meta"] = {k: _Inline(v) if small(v) else v for k, v in batch["meta"].items()}
    return out


def _unpack(batch: dict) -> dict:
    """In the main process: `_Inline` values become tensors again."""
    def tensor(v):
        return torch.from_numpy(v.array) if isinstance(v, _Inline) else v

    out = {k: tensor(v) for k, v in batch.items()}
    if isinstance(batch.get("meta"), dict):
        out["meta"] = {k: tensor(v) for k, v in batch["meta"].items()}
    return out


def _rare_gc(worker_id: int = 0) -> None:
    """Loader workers collect garbage 70x less often. A worker holds a shuffle buffer of ~1,000 records
    (nested caption/scene dicts: ~50,000 tracked objects) and allocates thousands more per batch, so the
    default thresholds run a collection that walks the buffer every few samples: 3 ms of a 15 ms batch
    (cProfile charged it to the JSON parser). The records hold no reference cycles to reclaim."""
    import gc

    gc.set_threshold(50_000, 20, 100)


def _as_is(batch):
    """The stream yields finished batches; the default per-batch conversion would only walk the meta."""
    return batch


class _ThreadedIterator:
    """Pulls batches from the loader's worker processes in a background thread, ``depth`` ahead.

    Receiving a finished batch from a worker (queue read, unpickling, mapping the tensors' shared memory)
    costs the training loop ~2 ms of Python per step on this repository's CPU machine, 4-5% of a default
    step; a thread does it while the main thread is inside the towers' kernels (which release the GIL).
    Errors raised by the loader (a bad shard under ``data.strict``) are re-raised in the main thread.
    """

    def __init__(self, iterator, depth: int = 2, stop_requested=None):
        self._iterator = iterator
        # Lightning's SIGTERM handler only sets a flag that its loops read between batches; a main
        # thread blocked here on a batch that never comes would never see it, so the wait polls it.
        self._stop_requested = stop_requested or (lambda: False)
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightning-clip-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._iterator:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self._put(("error", err))

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                kind, value = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if self._stop_requested():
                    from lightning.pytorch.utilities.exceptions import SIGTERMException

                    # no join: the thread may be blocked inside the loader, which shuts down its
                    # workers when the trainer lets go of it
                    self._stop.set()
                    raise SIGTERMException(1) from None
        if kind == "batch":
            return value
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop pulling; waits for the thread, so the loader's iterator can be reset safely."""
        self._stop.set()
        self._thread.join()


class _EpochLoader(DataLoader):
    """Tells the stream which epoch it is, so non-persistent workers do not replay the same order.

    With ``prefetch_thread`` (training with worker processes) batches are received by a background
    thread (`_ThreadedIterator`)."""

    prefetch_thread = False
    stop_requested = None  # () -> bool: the trainer received SIGTERM (see `_ThreadedIterator`)

    def __iter__(self):
        previous = getattr(self, "_threaded", None)
        if previous is not None:
            # persistent workers reuse one iterator: the previous epoch's thread must let go of it first
            previous.close()
            self._threaded = None
        self.dataset.epoch = getattr(self, "_epoch", 0)
        self._epoch = self.dataset.epoch + 1
        iterator = super().__iter__()
        if self.num_workers > 0:
            iterator = map(_unpack, iterator)  # what the workers sent by value (`_pack`)
        if self.prefetch_thread and self.num_workers > 0:
            self._threaded = _ThreadedIterator(iterator, stop_requested=self.stop_requested)
            return self._threaded
        if not self.dataset.train:
            return self._nonempty(iterator)
        return iterator

    def _nonempty(self, iterator):
        """Validation batches; none at all from shards this rank reads is an error: the run would end
        with exit 0 and no val/* metric, and the ablation runner would tabulate nothing."""
        stream = self.dataset
        delivered = False
        for batch in iterator:
            delivered = True
            yield batch
        if not delivered and stream.shards[stream.rank::stream.world_size]:
            raise EmptyStreamError(_no_sample_message(stream.shards, "data.val_shards"))


def _subset(option: str, values: Optional[list[int]], allowed: tuple[int, ...], what: str,
            none_means: str) -> Optional[list[int]]:
    """A caption filter option (`caption_levels`, `caption_objects`): None, or a sorted non-empty list of
    distinct values from ``allowed``; anything else is an error that names the option."""
    if values is None:
        return None
    bad = [v for v in values if isinstance(v, bool) or v not in allowed]
    if bad or not len(values):
        raise ValueError(f"data.{option}={list(values)!r}: give a non-empty list of {what} from {list(allowed)} "
                         f"(or null for {none_means}); invalid: {bad or 'empty list'}")
    return sorted({int(v) for v in values})


class ClipDataModule(LightningDataModule):
    """Image-caption shards -> batches (see CONTRACTS.md "The batch").

    Args:
        train_shards: training shards: a directory of ``.tar``, a glob, or a brace pattern.
        val_shards: validation shards, same forms.
        batch_size: items per training batch (per device).
        val_batch_size: items per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        image_size: output image side (resize the shorter side, centre crop).
        max_length: tokens per caption, with ``[CLS]``/``[SEP]``; longer captions are truncated.
        tokenizer: ``"auto"`` (synthetic ``tokenizer.json`` beside the shards, else a WordPiece trained on
            the train captions and cached under ``tokenizer_cache``), a ``tokenizer.json`` path, or a
            transformers name (needs the hub).
        tokenizer_vocab_size: vocabulary size of a trained WordPiece.
        tokenizer_cache: where trained tokenizers are cached (never the shard folder).
        epoch_length: training items per epoch (training is resampled and infinite); long by default,
            because each epoch restarts the workers' streams (see `EPOCH_LENGTH`).
        shuffle_buffer: samples in the training shuffle buffer.
        batching: ``"image"`` (one item per image, one random caption) or ``"caption"`` (one item per
            caption: an image appears several times in a batch; group ids mark the positives).
        strict: raise on the first bad sample instead of skipping it.
        mean: normalisation mean (CLIP's by default).
        std: normalisation std.
        augment: random resized crops for training (no flips: captions name positions).
        generate: ``{"root": ROOT, **kw}``: if ``train_shards``/``val_shards`` are exactly ``ROOT/train`` and
            ``ROOT/val`` and missing, generate the synthetic world into ROOT first (with a printed line)
            with the arguments ``kw`` of `lightning_clip.data.synthetic.generate` (e.g. ``{"seed": 0,
            "num_train": 20000, "num_val": 500}``). ROOT defaults to `DEFAULT_GENERATE_ROOT`
            (``data/synthetic48``). Shards anywhere else are never generated: a missing path is an error.
        seed: seed of the training stream (shard choice, shuffling, caption choice).
        caption_levels: specificity levels (1..4, see `lightning_clip.data.synthetic`) that training
            captions are drawn from; None = all. Image batching draws each image's caption among its
            captions at these levels (an image with none falls back to all of its captions); caption
            batching emits only the captions at these levels. Validation always sees every caption.
            Synthetic data only (real captions have no level).
        caption_objects: how many objects a training caption may describe (1..3: "a red thing" describes
            one, "a cross and a star" two); None = any. Combined with ``caption_levels`` (both must hold),
            the same fallback rules. ``[1]`` with level 1 leaves the vaguest captions, which fit the most
            images: the most false negatives per batch (the `duplicates` ablation). Synthetic data only.
        cache_records: decoded training samples each loader worker may keep in memory (0: none). Whole
            shards are kept, first come first kept, and later passes over them skip the tar, JSON and
            image decoding; the batches are the same. Roughly image bytes plus a few KB per sample: the
            synthetic world's 20,000 at 48 px hold 138 MB of pixels per worker.
    """

    def __init__(self, train_shards: str = "data/synthetic/train", val_shards: str = "data/synthetic/val",
                 batch_size: int = 64, val_batch_size: Optional[int] = None, num_workers: int = 2,
                 image_size: int = 64, max_length: int = 32, tokenizer: str = "auto",
                 tokenizer_vocab_size: int = 4000, tokenizer_cache: str = "data/tokenizers",
                 epoch_length: int = EPOCH_LENGTH, shuffle_buffer: int = 1000, batching: str = "image",
                 strict: bool = False, mean: tuple[float, float, float] = CLIP_MEAN,
                 std: tuple[float, float, float] = CLIP_STD, augment: bool = False,
                 generate: Optional[dict[str, Any]] = None, seed: int = 0,
                 caption_levels: Optional[list[int]] = None, caption_objects: Optional[list[int]] = None,
                 cache_records: int = 0):
        super().__init__()
        if batching not in BATCHING_MODES:
            raise ValueError(f"data.batching={batching!r}; choices: {list(BATCHING_MODES)}")
        caption_levels = _subset("caption_levels", caption_levels, CAPTION_LEVELS, "specificity levels", "all")
        caption_objects = _subset("caption_objects", caption_objects, CAPTION_OBJECTS, "object counts", "any")
        for name, v in (("batch_size", batch_size), ("epoch_length", epoch_length), ("max_length", max_length)):
            if v < 1:
                raise ValueError(f"data.{name}={v} must be >= 1")
        if cache_records < 0:
            raise ValueError(f"data.cache_records={cache_records} must be >= 0 (0 keeps nothing)")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.image_size, self.max_length = num_workers, image_size, max_length
        self.epoch_length, self.shuffle_buffer, self.batching = epoch_length, shuffle_buffer, batching
        self.strict, self.mean, self.std, self.augment = strict, tuple(mean), tuple(std), augment
        self.generate, self.seed, self.caption_levels = generate, seed, caption_levels
        self.caption_objects, self.cache_records = caption_objects, cache_records
        self._skips = SkipPolicy(strict)
        # Workers fork after the tokenizer may have run here; its Rust thread pool must stay off.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = self._load_tokenizer(tokenizer, tokenizer_vocab_size, tokenizer_cache)
        self.vocab_size: int = len(self.tokenizer)
        self.pad_token_id: int = int(self.tokenizer.pad_token_id)
        self._train: Optional[ShardStream] = None
        self._val: Optional[ShardStream] = None
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches trained in it), from a checkpoint

    # ------------------------------------------------------------------------------------ setup
    @property
    def skipped(self) -> int:
        """Samples skipped so far (bad input), across all workers of this process."""
        return self._skips.count

    def _generate_root(self) -> Optional[Path]:
        """The folder to generate the synthetic world into, or None. Only ``data.generate.root`` (default
        `DEFAULT_GENERATE_ROOT`), only when the shards are exactly ``<root>/train`` and ``<root>/val`` and
        absent: a shard path the user typed (a typo, or real data that is not there) must fail, not
        become a synthetic world."""
        if not self.generate:
            return None
        r = os.path.normpath(str(self.generate.get("root") or DEFAULT_GENERATE_ROOT))
        if (os.path.normpath(str(self.train_shards)), os.path.normpath(str(self.val_shards))) != (
                os.path.join(r, "train"), os.path.join(r, "val")):
            return None  # the shards point elsewhere: read them as given (a missing path is an error)
        if Path(self.train_shards).exists():
            return None
        return Path(r)

    def _load_tokenizer(self, spec: str, vocab_size: int, cache: str):
        from lightning_clip.data.synthetic import synthetic_tokenizer
        from lightning_clip.models.tokenizer import load_tokenizer

        if spec == "auto" and self._generate_root() is not None:
            return synthetic_tokenizer()  # what the generator will write beside the shards
        if spec != "auto":
            return load_tokenizer(spec)
        shards = expand_shards(self.train_shards, "train_shards")
        return load_tokenizer("auto", shards, cache_dir=cache, captions=iter_captions(shards),
                              vocab_size=vocab_size)

    def prepare_data(self) -> None:
        root = self._generate_root()
        if root is not None:
            from lightning_clip.data.synthetic import ensure_generated

            if not root.exists():
                print(f"data: {root} is absent; generating the synthetic world there (data.generate; "
                      "`make data` does it up front)", flush=True)
            ensure_generated(root, **{k: v for k, v in self.generate.items() if k != "root"})

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        if getattr(self, "_trainer", None) is None:
            self.prepare_data()  # a Trainer calls it itself (once per node, before setup)
        rank, world = self._world()
        common = dict(tokenizer=self.tokenizer, max_length=self.max_length, on_bad=self._skips,
                      rank=rank, world_size=world, num_workers=self.num_workers)
        if stage in (None, "fit"):
            self._train = ShardStream(
                expand_shards(self.train_shards, "train_shards"), train=True, batch_size=self.batch_size,
                transform=ImageTransform(self.image_size, self.mean, self.std, augment=self.augment),
                batching=self.batching, shuffle_buffer=self.shuffle_buffer, epoch_length=self.epoch_length,
                seed=self.seed, caption_levels=self.caption_levels,
                caption_objects=self.caption_objects, cache_records=self.cache_records, **common)
        if stage in (None, "fit", "validate", "test"):
            shards = expand_shards(self.val_shards, "val_shards")
            if len(shards) < world * max(1, self.num_workers):
                warnings.warn(f"data.val_shards has {len(shards)} shards for {world} node(s) x "
                              f"{self.num_workers} workers: some will read no validation data")
            self._val = ShardStream(shards, train=False, batch_size=self.val_batch_size,
                                    transform=ImageTransform(self.image_size, self.mean, self.std),
                                    **common)

    def _loader(self, stream: ShardStream, workers: int) -> DataLoader:
        return _EpochLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_rare_gc)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Moves the tensors of the batch dict and of its ``meta``; keys, captions and scenes stay put.

        Lightning's default walks every element of every nested list, which for a validation batch's
        scene dicts is thousands of Python calls per batch, only to find nothing to move."""
        if not (isinstance(batch, dict) and isinstance(batch.get("meta"), dict)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        move = lambda d: {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
                          for k, v in d.items()}
        return {**move(batch), "meta": move(batch["meta"])}

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        # Lightning warns that __len__ may be wrong with several workers; ours is exact (each worker
        # yields batches_per_worker batches from its own seed), so the warning is only noise.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        # Lightning warns that a mid-epoch resume replays data unless the loader has a state_dict; the
        # position is restored through this datamodule's state_dict instead (see `load_state_dict`)
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
        loader = self._loader(self._train, self.num_workers)
        loader.prefetch_thread = True
        loader.stop_requested = lambda: bool(getattr(self.trainer, "received_sigterm", False))
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if batches >= len(self._train):  # saved at the end of an epoch: the next one starts afresh
                epoch, batches = epoch + 1, 0
            self._train.resume_at(epoch, batches)
            if self.num_workers == 0:
                # the loader tells an in-process stream its epoch; persistent workers keep the epoch they
                # were started with (0), so it stays 0 for them, resumed or not
                loader._epoch = epoch
        return loader

    # -- resume: the checkpoint records where the training stream stands -----------------------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # processed, not completed: a checkpoint saved in on_train_batch_end has trained that batch too
        # (Lightning counts it completed when it restores)
        return {"train_epoch": int(trainer.current_epoch),
                "train_batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict) -> None:
        if "train_epoch" in state:
            self._resume = (int(state["train_epoch"]), int(state["train_batches"]))

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self.setup("validate")
        mine = len(self._val.shards[self._val.rank::self._val.world_size])
        return self._loader(self._val, min(self.num_workers, mine))  # no idle workers

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
