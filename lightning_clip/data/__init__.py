"""Data: the synthetic world (`synthetic`, its relevance `oracle`, its caption `likelihood`), shard reading
(`shards`), converters (`convert`), transforms, batch assembly (`batching`), the shard stream (`stream`), its
loader (`loader`) and the `ClipDataModule`."""
from __future__ import annotations

__all__ = ["ClipDataModule"]


def __getattr__(name):
    # Lazy, so that `python -m lightning_clip.data.synthetic` does not import itself twice.
    if name == "ClipDataModule":
        from lightning_clip.data.datamodule import ClipDataModule

        return ClipDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
