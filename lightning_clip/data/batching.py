"""Batch assembly: (record, caption index, image) items -> the batch dict of CONTRACTS.md, with the
relevance oracle's matrix when the data has synthetic ground truth.

Runs in the loader workers, so that the training step receives finished tensors.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from lightning_clip.data.shards import Record
from lightning_clip.data.oracle import object_bits, relevance_from_bits
from lightning_clip.models.tokenizer import CaptionEncoder


def collate(items: list[tuple[Record, int, torch.Tensor]], tokenizer, max_length: int,
            ground_truth: bool = True, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """(record, caption index, image tensor) items -> the batch dict of CONTRACTS.md.

    ``tokenizer`` is a tokenizer or a `CaptionEncoder` (which memoises each caption's row). With
    ``normalize`` (`ImageTransform.normalize`) the items' images are uint8 and are normalised here, once
    per batch; without it they are used as they are.

    ``ground_truth=False`` (training batches) leaves out ``scene`` and ``constraints``: only validation's
    semantic recall reads them, and every training step would otherwise pay for pickling a batch's
    nested dicts out of the worker and for Lightning's device transfer walking them.

    When every item has synthetic ground truth (train and val alike), ``meta["relevance"]`` is the
    oracle's bool ``[B images, B captions]`` matrix: entry (i, j) says caption j is true of image i (the
    diagonal always is). Real data gets no such key.
    """
    captions = [r.captions[k] for r, k, _ in items]
    encode = tokenizer if isinstance(tokenizer, CaptionEncoder) else CaptionEncoder(tokenizer, max_length)
    input_ids, attention_mask = encode(captions)
    # NHWC, the layout the image tower runs in (model.channels_last), made here in the loader worker
    # rather than in the training step; values are the same in either layout
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
            # count), computed here in the worker rather than in the training step
            off = int(rel.sum()) - int(rel.diagonal().sum())
            batch["meta"]["false_negative_share"] = torch.tensor(off / (n * (n - 1)), dtype=torch.float64)
    if ground_truth:
        batch["meta"]["scene"] = [r.scene for r, _, _ in items]
        batch["meta"]["constraints"] = [c["constraints"] if c else None for c in info]
    return batch


def oracle_bits(r: Record) -> tuple[list[int], list[list[int]]]:
    """``r``'s scene and each of its captions' constraints as the oracle's object bitsets
    (`lightning_clip.data.oracle.relevance_from_bits`), computed once per record and kept on it: the
    per-object Python is most of a batch's relevance matrix, and a record recurs in many batches."""
    if r.oracle_bits is None:
        r.oracle_bits = (object_bits(r.scene, "scene"),
                         [object_bits(c["constraints"], "constraints", k) for k, c in enumerate(r.caption_info)])
    return r.oracle_bits
