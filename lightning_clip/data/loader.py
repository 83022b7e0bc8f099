"""The loader between a `ShardStream` and the training loop: batches leave the workers with their small
tensors by value, a background thread receives them, and each pass tells the stream its epoch.

The stream yields whole batches (``batch_size=None``), so inter-process traffic is one message per batch.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from lightning_clip.data.stream import EmptyStreamError, ShardStream, no_sample_message

# Tensors up to this size leave a loader worker by value, pickled as numpy arrays (see `_Inline`).
INLINE_BYTES = 1 << 16


class _Inline:
    """A small tensor that crosses from a loader worker to the main process inside the pickle.

    A tensor pickled by a worker goes through shared memory: the worker's resource-sharer thread passes
    one file descriptor per tensor over a socket and the receiver maps it, Python and system calls on
    each side for every tensor. A batch holds one large tensor (the images) and nine small ones (token
    ids, mask, the meta ids, the relevance matrix): sending the small ones by value leaves one descriptor
    per batch. The values are the same (`torch.from_numpy` of the unpickled array)."""

    __slots__ = ("array",)

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()


def _pack(batch: dict) -> dict:
    """In a worker (the loader's ``collate_fn``): the batch's small tensors (and its meta's) become
    `_Inline`."""
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
    """Loader workers collect garbage far less often. A worker holds a shuffle buffer of ~1,000 records
    (nested caption/scene dicts: ~50,000 tracked objects) and allocates thousands more per batch, so the
    default thresholds run a collection that walks the buffer every few samples. The records hold no
    reference cycles to reclaim."""
    import gc

    gc.set_threshold(50_000, 20, 100)


def _as_is(batch):
    """The stream yields finished batches; the default per-batch conversion would only walk the meta."""
    return batch


class _ThreadedIterator:
    """Pulls batches from the loader's worker processes in a background thread, ``depth`` ahead.

    Receiving a finished batch from a worker (queue read, unpickling, mapping the tensors' shared memory)
    is Python work in the training loop's thread; a thread does it while the main thread is inside the
    towers' kernels (which release the GIL). Errors raised by the loader (a bad shard under
    ``data.strict``) are re-raised in the main thread.
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
    """Tells the stream that a pass begins (`StreamPosition.begin_epoch`), so that an in-process stream
    does not replay the same order every epoch.

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
        self.dataset.position.begin_epoch()
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
            raise EmptyStreamError(no_sample_message(stream.shards, "data.val_shards"))


def epoch_loader(stream: ShardStream, workers: int, *, prefetch_thread: bool = False,
                 stop_requested: Optional[Callable[[], bool]] = None) -> DataLoader:
    """A loader over ``stream`` with ``workers`` persistent worker processes (0: in this process)."""
    loader = _EpochLoader(stream, batch_size=None, collate_fn=_pack if workers > 0 else _as_is,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=_rare_gc)
    loader.prefetch_thread, loader.stop_requested = prefetch_thread, stop_requested
    return loader
