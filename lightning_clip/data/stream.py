"""`ShardStream`: image-caption shards -> collated batches, and `StreamPosition`, where it stands.

Training is resampled and infinite (shards drawn with replacement, a sample shuffle buffer, one caption
drawn per visit) and cut into epochs of ``epoch_length`` samples; a loader worker may keep decoded
shards in memory (``cache_records``). Validation is deterministic: every caption of every image, one
item per (image, caption) pair, in shard order, shards split across nodes and loader workers without
duplication or loss.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

from lightning_clip.data.batching import collate
from lightning_clip.data.shards import Record, SkipPolicy, iter_records
from lightning_clip.data.transforms import ImageTransform
from lightning_clip.models.tokenizer import CaptionEncoder

# Items per training epoch: the size of the synthetic training set. Each epoch restarts the workers'
# streams, and the first batch then waits for the shuffle buffer to refill, so epochs are kept long.
EPOCH_LENGTH = 20000


class EmptyStreamError(RuntimeError):
    """A full pass over the shards yielded no sample (every shard empty, or every sample skipped)."""


def no_sample_message(shards: list[str], option: str) -> str:
    names = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
    return (f"{option}: a full pass over its {len(shards)} shard(s) ({names}) yielded no sample: every shard "
            "is empty or every sample in it was skipped as bad (see the DataWarnings above, or rerun with "
            "data.strict=true to stop at the first); point the option at valid shards")


@dataclass
class StreamPosition:
    """Where a stream stands: what seeds its passes and what a resumed run has already trained on.

    A training pass's random order is a function of (seed, rank, worker role, ``epoch``, ``passes``).
    The stream travels to each loader worker as a copy, position included: a persistent worker keeps
    the ``epoch`` it was started with (0) and counts its own ``passes``, while a stream iterated in the
    main process gets each epoch from the loader (`begin_epoch`). `resume` sets the position an
    uninterrupted run would have reached; it must run before the workers start.
    """

    epoch: int = 0       # the epoch the current pass seeds from
    next_epoch: int = 0  # the epoch the loader's next pass gives it
    passes: int = 0      # passes made by this copy of the stream
    skip: int = 0        # batches of the next pass already trained on before a resume

    def begin_epoch(self) -> None:
        """The loader starts a pass (in the main process)."""
        self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1

    def begin_pass(self) -> int:
        """The stream starts a pass (in the process that iterates it); returns the batches to skip."""
        self.passes += 1
        skip, self.skip = self.skip, 0
        return skip

    def resume(self, epoch: int, batches: int, batches_per_epoch: int, in_process: bool) -> None:
        """Continue epoch ``epoch`` (0-based) after its first ``batches`` batches."""
        if batches >= batches_per_epoch:  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.passes, self.skip = epoch, batches
        if in_process:
            # persistent workers keep the epoch they were started with (0), resumed or not
            self.next_epoch = epoch


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
        # passes over a shard skip the tar, JSON and image decoding (see `ClipDataModule`'s cache_records)
        self.cache_records, self._cache, self._cached = cache_records, {}, 0
        self.batching, self.shuffle_buffer, self.epoch_length, self.seed = batching, shuffle_buffer, epoch_length, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 0)
        self.position = StreamPosition()

    def batches_per_worker(self) -> int:
        return max(1, math.ceil(self.epoch_length / (self.batch_size * self.world_size * max(1, self.num_workers))))

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("the validation stream has no fixed length")
        return self.batches_per_worker() * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        return self._iter_batches(get_worker_info())

    def _iter_batches(self, info) -> Iterator[dict]:
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skip = self.position.begin_pass()
        if self.train:
            # The loader takes batches from its workers round-robin, starting at worker 0; after a resume
            # the uninterrupted run's next batch is that of worker skip % workers, so the workers take
            # over the streams (seed and position) of the ones they stand in for.
            role = (worker + skip) % workers
            done = len(range(role, skip, workers))  # batches of this stream among the first `skip`
            rng = random.Random(hash((self.seed, self.rank, role, self.position.epoch, self.position.passes)))
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
                msg = no_sample_message(self.shards, "data.train_shards")
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
