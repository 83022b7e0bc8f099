"""Small data modules over a tiny generated world, shared by the data tests."""
from __future__ import annotations

from pathlib import Path

from lightning_clip.data import ClipDataModule


def small_dm(world: Path, *, epoch_length: int = 32, **kw) -> ClipDataModule:
    """A set-up data module over ``world`` (from `synthetic.generate`): batch 8, no worker processes, a
    16-sample shuffle buffer; any option can be overridden."""
    kw = {"train_shards": str(world / "train"), "val_shards": str(world / "val"), "batch_size": 8,
          "num_workers": 0, "epoch_length": epoch_length, "shuffle_buffer": 16, **kw}
    dm = ClipDataModule(**kw)
    dm.setup("fit")
    return dm
