"""`ClipDataModule`: streams image-caption shards into the project's batch dict.

The options, the tokenizer, generating the synthetic world, the node split, and the checkpointed
training position; the stream itself is `lightning_clip.data.stream`, batch assembly
`lightning_clip.data.batching`, the loader `lightning_clip.data.loader`.

Skipped samples (see `lightning_clip.data.shards`) are counted in a counter shared with the workers:
``datamodule.skipped`` is the running total for this process (train and val), which the module logs as
``data/skipped``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_clip.data.loader import epoch_loader
from lightning_clip.data.shards import SkipPolicy, expand_shards, iter_captions
from lightning_clip.data.stream import EPOCH_LENGTH, ShardStream
from lightning_clip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

BATCHING_MODES = ("image", "caption")
#: the synthetic world's caption specificity levels (`lightning_clip.data.synthetic.LEVEL_ATTRIBUTES`)
CAPTION_LEVELS = (1, 2, 3, 4)
CAPTION_OBJECTS = (1, 2, 3)  # a caption describes 1..MAX_OBJECTS objects of its scene
# Where `data.generate` may build the synthetic world when its options name no root: base.yaml's shards
# (and `make data`'s output). Shards pointed anywhere else are never generated.
DEFAULT_GENERATE_ROOT = "data/synthetic48"


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
        # training and validation count apart: a resumed run re-reads the training stream up to where it
        # stopped (recounting its skips) but not the validations before the checkpoint, whose count the
        # checkpoint carries (`state_dict`)
        self._skips = SkipPolicy(strict)
        self._val_skips = SkipPolicy(strict)
        # Workers fork after the tokenizer may have run here; its Rust thread pool must stay off.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = self._load_tokenizer(tokenizer, tokenizer_vocab_size, tokenizer_cache)
        self.vocab_size: int = len(self.tokenizer)
        self.pad_token_id: int = int(self.tokenizer.pad_token_id)
        self._train: Optional[ShardStream] = None
        self._val: Optional[ShardStream] = None
        # (epoch, batches trained in it) from a checkpoint, until the training loader hands it to the
        # stream's `StreamPosition`
        self._resume: Optional[tuple[int, int]] = None

    # ------------------------------------------------------------------------------------ setup
    @property
    def skipped(self) -> int:
        """Samples skipped so far (bad input), across all workers of this process."""
        return self._skips.count + self._val_skips.count

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
        common = dict(tokenizer=self.tokenizer, max_length=self.max_length,
                      rank=rank, world_size=world, num_workers=self.num_workers)
        if stage in (None, "fit"):
            self._train = ShardStream(
                expand_shards(self.train_shards, "train_shards"), train=True, batch_size=self.batch_size,
                transform=ImageTransform(self.image_size, self.mean, self.std, augment=self.augment),
                batching=self.batching, shuffle_buffer=self.shuffle_buffer, epoch_length=self.epoch_length,
                seed=self.seed, caption_levels=self.caption_levels,
                caption_objects=self.caption_objects, cache_records=self.cache_records, on_bad=self._skips,
                **common)
        if stage in (None, "fit", "validate", "test"):
            shards = expand_shards(self.val_shards, "val_shards")
            if len(shards) < world * max(1, self.num_workers):
                warnings.warn(f"data.val_shards has {len(shards)} shards for {world} node(s) x "
                              f"{self.num_workers} workers: some will read no validation data")
            self._val = ShardStream(shards, train=False, batch_size=self.val_batch_size,
                                    transform=ImageTransform(self.image_size, self.mean, self.std),
                                    on_bad=self._val_skips, **common)

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
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            self._train.position.resume(epoch, batches, batches_per_epoch=len(self._train),
                                        in_process=self.num_workers == 0)
        return epoch_loader(self._train, self.num_workers, prefetch_thread=True,
                            stop_requested=lambda: bool(getattr(self.trainer, "received_sigterm", False)))

    # -- resume: the checkpoint records where the training stream stands -----------------------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # processed, not completed: a checkpoint saved in on_train_batch_end has trained that batch too
        # (Lightning counts it completed when it restores)
        return {"train_epoch": int(trainer.current_epoch),
                "train_batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
                "val_skipped": self._val_skips.count}

    def load_state_dict(self, state: dict) -> None:
        if "train_epoch" in state:
            self._resume = (int(state["train_epoch"]), int(state["train_batches"]))
        if self._world()[0] == 0:  # rank 0's count (the one saved); other ranks' earlier skips are not kept
            self._val_skips.restore(int(state.get("val_skipped", 0)))

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self.setup("validate")
        mine = len(self._val.shards[self._val.rank::self._val.world_size])
        return epoch_loader(self._val, min(self.num_workers, mine))  # no idle workers

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
