"""Items' identities in a batch: finding each distinct item once by id, and the ids per-item state is
keyed by (`item_ids`).

A caption-per-row batch holds every image once per caption, and distributed padding repeats items at the
end of a split. Training (the module's eval-mode forward runs the image tower once per distinct image)
and evaluation (retrieval and `embed_split` keep each image and caption once) deduplicate the same way,
so the helper lives here, where both import it from.
"""
from __future__ import annotations

import torch
from torch import Tensor


def first_occurrences(ids: Tensor, return_inverse: bool = False):
    """Indices of the first occurrence of each distinct id (order: ascending id).

    With ``return_inverse``, ``(first, inverse)`` such that ``ids == ids[first][inverse]``: work done on
    ``first`` is expanded back to every row with ``inverse``."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return (first, inverse) if return_inverse else first


def item_ids(meta: dict, n: int, device=None) -> tuple[Tensor, Tensor]:
    """The batch rows' identities: ``(image ids, caption ids)``, long ``[n]``. An image is its
    ``meta["image_id"]``; a caption is a 53-bit hash of ``meta["key"]`` ("<sample key>#<caption index>",
    one per training caption). ``text_id`` is no substitute: identical captions of different images share
    it, and their states would mix positives."""
    from lightning_clip.data.synthetic import stable_id  # the project's one cross-process string hash

    if meta.get("image_id") is None or meta.get("key") is None:
        raise KeyError("per-item state (gcl) needs meta['image_id'] and meta['key'] to key its items")
    image = torch.as_tensor(meta["image_id"], dtype=torch.long).reshape(n)
    text = torch.tensor([stable_id(f"gcl/caption/{k}") for k in meta["key"]], dtype=torch.long)
    return image.to(device), text.to(device)
