"""Finding each distinct item once in a batch that repeats it, by id.

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
