"""What every loss family does to its inputs first: validate them and lift them to full precision.

A contrastive loss fed an empty batch, mismatched shapes or a NaN feature returns NaN (or crashes deep
inside a matmul) without saying why; these checks turn that into a ValueError that names the tensor.
The finiteness check reads one flag back from the device per call, which is negligible next to the loss.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _lift(x):
    return x.float() if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


def full_precision(fn):
    """Run a pure loss function in float32 (float64 inputs stay float64) with autocast off.

    Casting the inputs is not enough under autocast: the matmuls inside would be cast back down. Logits at
    scale 100 and log-sum-exps over thousands of columns lose too much in bf16/fp16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [_lift(a) for a in args]
        kwargs = {k: _lift(v) for k, v in kwargs.items()}
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        device = first.device.type if first is not None else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def normalize(x: Tensor) -> Tensor:
    """L2-normalise rows; eps keeps an all-zero row finite (it maps to 0, not NaN)."""
    return F.normalize(x, dim=-1, eps=1e-12)


class NonFiniteError(ValueError):
    """A loss was handed NaN or inf features (the model diverged, or the data holds such values)."""


def _require_finite(named: dict[str, Tensor], where: str) -> None:
    floats = {k: v for k, v in named.items() if v is not None and v.is_floating_point()}
    if not floats:
        return
    flags = torch.stack([torch.isfinite(v).all() for v in floats.values()])
    if not bool(flags.all()):
        bad = [k for k, ok in zip(floats, flags.tolist()) if not ok]
        raise NonFiniteError(f"{where}: {', '.join(bad)} contain(s) NaN or inf values")


def check_pair(where: str, image: Tensor, text: Tensor, **per_row: Optional[Tensor]) -> int:
    """Validate ``image``/``text`` ``[N, D]`` (same shape, N >= 1, D >= 1, finite) and optional per-row
    tensors ``[N]`` (log-stds, group ids). Returns N. ``where`` names the loss in the message."""
    for name, t in (("image", image), ("text", text)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{where}: {name} features must be a [N, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if image.shape != text.shape:
        raise ValueError(f"{where}: image and text features must have the same shape [N, D], got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    n, d = image.shape
    if n == 0:
        raise ValueError(f"{where}: empty batch (N = 0); a contrastive loss needs at least one pair")
    if d == 0:
        raise ValueError(f"{where}: features have zero width (D = 0)")
    for name, t in per_row.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{where}: {name} must have shape [N] = [{n}], got {tuple(t.shape)}")
    _require_finite({"image": image, "text": text, **per_row}, where)
    return n


def pairwise_blocks(score, na: int, nb: int, per_pair: int, block: int, like: Tensor) -> Tensor:
    """``[na, nb]`` scores of every (a, b) pair, ``score(rows, cols)`` (two slices) filling one block at a
    time: at most 64 rows and ``block`` token products per block, so a whole validation set's token-wise
    scores (filip, damsm) stay within memory. Exact, as each pair's score depends on that pair alone."""
    rows = max(1, min(na, 64))
    cols = max(1, block // (rows * max(1, per_pair)))
    out = like.new_empty(na, nb)
    for i in range(0, na, rows):
        for j in range(0, nb, cols):
            out[i:i + rows, j:j + cols] = score(slice(i, i + rows), slice(j, j + cols))
    return out


def check_variance_pair(where: str, image: Tensor, text: Tensor, image_ln_std: Optional[Tensor],
                        text_ln_std: Optional[Tensor]) -> int:
    """`check_pair` for the families whose variance heads predict one log-std per item (``[N]`` each,
    both required). Returns N."""
    if image_ln_std is None or text_ln_std is None:
        raise ValueError(f"{where}: needs image_ln_std and text_ln_std (the variance heads)")
    return check_pair(where, image, text, image_ln_std=image_ln_std, text_ln_std=text_ln_std)


def check_local(where: str, feats: Tensor, mask: Optional[Tensor], name: str, mask_name: str) -> None:
    """Validate local features ``[N, K, D]`` (regions or words) and their bool mask ``[N, K]``: every item
    must keep at least one real entry, or its attention has nothing to attend to."""
    if not isinstance(feats, Tensor) or feats.dim() != 3:
        raise ValueError(f"{where}: {name} must be a [N, K, D] tensor, got "
                         f"{tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__}")
    if feats.shape[0] == 0:
        raise ValueError(f"{where}: empty batch (N = 0) in {name}")
    if feats.shape[1] == 0 or feats.shape[2] == 0:
        raise ValueError(f"{where}: {name} has an empty axis, shape {tuple(feats.shape)}")
    if mask is not None:
        if tuple(mask.shape) != tuple(feats.shape[:2]):
            raise ValueError(f"{where}: {mask_name} must have shape {tuple(feats.shape[:2])} (like {name} "
                             f"without D), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"{where}: {mask_name} must be a bool tensor (True = real), got {mask.dtype}")
        empty = (~mask.any(1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"{where}: {mask_name} leaves no real entry for item(s) {empty.tolist()[:8]}")
    _require_finite({name: feats}, where)


def check_token_pair(where: str, image: Tensor, image_mask: Optional[Tensor], text: Tensor,
                     text_mask: Optional[Tensor], names: tuple[str, str, str, str]) -> tuple[Tensor, Tensor]:
    """`check_local` on both sides of a region/word (token) pair, which must agree on N and D; returns the
    two masks, all-True where none was given. ``names``: the four argument names, for the messages."""
    image_name, image_mask_name, text_name, text_mask_name = names
    check_local(where, image, image_mask, image_name, image_mask_name)
    check_local(where, text, text_mask, text_name, text_mask_name)
    if image.shape[0] != text.shape[0] or image.shape[2] != text.shape[2]:
        raise ValueError(f"{where}: {image_name} [N, R, D] and {text_name} [N, L, D] must agree on N and D, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    ones = lambda t: torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)  # noqa: E731
    return (ones(image) if image_mask is None else image_mask,
            ones(text) if text_mask is None else text_mask)
