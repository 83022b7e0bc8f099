"""Losses under data parallelism: gather features *with gradient* and compute local rows against global
columns (open_clip's ``gather_with_grad`` + ``local_loss``).

Why the gradients come out right. Rank r holds B_r of the N pairs. `gather` concatenates every rank's
tensor; its backward sums the gradient that every rank's loss sends to a piece (reduce-scatter), so the
piece held by rank r receives sum_r' dL_r'/dx_r. DDP then averages parameter gradients over the W ranks.

- Row-decomposable families (infonce, siglip, dcl, multi_positive, nce, probabilistic, soft_targets
  "fixed", damsm, cyclip, hn_nce, pcmepp, filip): the single-process loss is a mean over N rows, L = (1/N) sum_i l_i, where row i needs
  its own item and *all* columns. Rank r computes L_r = (1/B_r) sum_{i local} l_i. With equal B_r = N/W,
  (1/W) sum_r dL_r/dtheta = dL/dtheta exactly; the logged loss is the mean of L_r, i.e. L.
- Families that do not decompose (soft_targets "tutorial": its column direction reads every row's
  softmax normaliser; cloob: its Hopfield memory and InfoLOOB columns are the whole batch) compute the whole global loss on every rank; each piece then gets W * dL/dx_r from
  the backward sum and DDP's 1/W brings it back to dL/dtheta.

Ranks may hold batches of different sizes (a last, short batch) or, for words, different padded lengths:
`gather` exchanges shapes first and pads. (With unequal B_r the row families weight each rank's rows by
1/B_r; that is DDP's usual per-rank mean and only matters for that last batch.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_distributed() -> bool:
    return world_size() > 1


def gather(t: Tensor, pad_value=0) -> tuple[Tensor, int]:
    """Concatenate every rank's ``t`` along dim 0 (rank order); returns ``(global, offset)`` where
    ``offset`` is the index of this rank's first row. Floating tensors keep their gradient (summed back
    over ranks in backward); other dims that differ between ranks are padded with ``pad_value``.
    Without an initialised process group (or one process) it returns ``(t, 0)`` untouched."""
    w = world_size()
    if w == 1:
        return t, 0
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(w)]
    dist.all_gather(shapes, shape)
    shapes = torch.stack(shapes).tolist()
    biggest = [max(s[d] for s in shapes) for d in range(t.dim())]
    if list(t.shape) != biggest:
        padded = t.new_full(biggest, pad_value)
        padded[tuple(slice(0, s) for s in t.shape)] = t
        t = padded
    if t.is_floating_point() and t.requires_grad:
        parts = list(torch.distributed.nn.functional.all_gather(t))
    else:
        parts = [torch.empty_like(t) for _ in range(w)]
        dist.all_gather(parts, t.contiguous())
    parts = [p[: s[0]] for p, s in zip(parts, shapes)]
    offset = sum(s[0] for s in shapes[: rank()])
    return torch.cat(parts), offset


def gather_tokens(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Every rank's token features ``[N, L, D]`` and their boolean mask ``[N, L]`` (ranks may differ in
    L: shorter ones are padded with masked-out tokens); returns ``(tokens, mask, offset)``."""
    tokens_all, offset = gather(tokens)
    return tokens_all, gather(mask, False)[0], offset


def gather_optional(t: Optional[Tensor], pad_value=0) -> Optional[Tensor]:
    return None if t is None else gather(t, pad_value)[0]


@dataclass
class Rows:
    """Local rows and global columns of one batch. In one process ``image_all is image`` and
    ``offset == 0``, so the same code computes the plain single-process loss."""

    image: Tensor       # [B, D] this rank's images
    text: Tensor        # [B, D] this rank's captions
    image_all: Tensor   # [N, D] every rank's images
    text_all: Tensor    # [N, D]
    offset: int         # global index of local row 0

    @property
    def local(self) -> bool:
        return self.image_all is self.image and self.text_all is self.text

    @property
    def labels(self) -> Tensor:
        """Global column index of each local row's positive."""
        return torch.arange(self.image.shape[0], device=self.image.device) + self.offset

    def pairwise(self, fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """``fn(images [a, D], texts [b, D]) -> [a, b]`` scores, returned as ``(i2t [B, N], t2i [B, N])``:
        local images against every caption, and local captions against every image. Single-process
        computes the square matrix once and transposes it."""
        if self.local:
            m = fn(self.image, self.text)
            return m, m.T
        return fn(self.image, self.text_all), fn(self.image_all, self.text).T


def split_rows(image: Tensor, text: Tensor, gathered: bool = True) -> Rows:
    """`Rows` for the current process group (gathering with gradient when distributed)."""
    if not gathered or not is_distributed():
        return Rows(image, text, image, text, 0)
    image_all, offset = gather(image)
    text_all, _ = gather(text)
    return Rows(image, text, image_all, text_all, offset)
