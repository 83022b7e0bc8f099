"""Exact CLIP InfoNCE and SigLIP losses whose memory grows with N*D instead of N^2.

The dense losses build the full [N, N] logit matrix and keep it (and its softmax) for backward: open_clip's
ClipLoss needs about 4 float32 copies of it, 16.5 GiB at N = 32,768. Here the matrix is never materialised: it is visited in tiles of
``chunk_size x chunk_size``, and each tile is recomputed from the features when it is needed again. The
values and gradients are the dense ones up to floating-point rounding (tests/test_tiled.py checks this),
so these functions are drop-in replacements; ``functional.infonce(..., chunk_size=...)`` and
``functional.siglip(..., chunk_size=...)`` dispatch here.

Memory: the features, two [N] statistics, the two [N, D] gradient accumulators and two tile buffers,
i.e. O(N*D + chunk^2). Time: the matrix products dominate (each costs 2*N^2*D flops):

- InfoNCE needs four: forward computes the tiles once for the row and column log-sum-exps (one pass gives
  both: a tile yields a partial LSE for each of its rows *and* each of its columns, merged with an online
  log-sum-exp); backward recomputes each tile and multiplies by it twice. Backward cannot be fused into the
  forward because every gradient entry needs the *final* LSE of its row and of its column.
- SigLIP needs three: a SigLIP gradient entry depends on its own logit only, so the forward pass, when a
  gradient is wanted, produces the gradients in the same sweep and the backward pass only scales them.

The default chunk of 2048 keeps the CPU matmuls near their peak rate while the two tile buffers stay at
16 MiB each in float32 (benchmarks/loss_memory.py measures both).

Both take ``logit_scale`` as a multiplier (``exp(log_scale)``), like the dense functions, and everything
runs in float32 (float64 inputs stay float64) with autocast disabled: the logits of a contrastive loss
lose too much in half precision.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["tiled_infonce", "tiled_siglip"]

Scalar = Union[Tensor, float]


# -- shared helpers -----------------------------------------------------------------------------------
def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of each tile along one axis; the last one is shorter when chunk does not divide n."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


class _Buffers:
    """Two reusable tile buffers. Allocating a fresh chunk^2 tensor per tile would, for large chunks, go
    through mmap and page-fault on every tile; reusing one flat buffer keeps the pages warm."""

    def __init__(self, chunk: int, n: int, like: Tensor):
        size = min(chunk, n) ** 2
        self.flat = (torch.empty(size, dtype=like.dtype, device=like.device),
                     torch.empty(size, dtype=like.dtype, device=like.device))

    def get(self, which: int, rows: int, cols: int) -> Tensor:
        return self.flat[which][: rows * cols].view(rows, cols)


def _shared_shift_limit(dtype: torch.dtype) -> float:
    """Largest spread of a tile for which one shift (the tile max) keeps every exp() finite and normal:
    exp(x - max) >= exp(-limit) must not underflow, exp(max - lse) <= exp(limit) must not overflow."""
    info = torch.finfo(dtype)
    return min(-math.log(info.tiny), math.log(info.max)) - 8.0


def _tile_shift(tile: Tensor, limit: float) -> Optional[float]:
    """The tile max when one exp() pass with that shift is exact enough for both row and column sums, else
    None (fall back to per-row and per-column shifts). CUDA always falls back: reading the max back to
    the host would synchronise on every tile, and there the extra exp pass is cheap."""
    if tile.device.type != "cpu":
        return None
    lo, hi = tile.aminmax()
    lo, hi = float(lo), float(hi)
    return hi if hi - lo < limit else None


def _prepare(image: Tensor, text: Tensor, *scalars: Optional[Scalar]):
    """Validate shapes, pick the compute dtype (float32 unless an input is float64) and cast to it."""
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must both be [N, D] with the same shape, got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    dtype = torch.promote_types(image.dtype, text.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    out = [image.to(dtype), text.to(dtype)]
    for s in scalars:
        if s is None:
            out.append(None)
            continue
        s = torch.as_tensor(s, device=image.device)
        if s.numel() != 1:
            raise ValueError(f"logit_scale / logit_bias must be scalars, got shape {tuple(s.shape)}")
        out.append(s.reshape(()).to(dtype))
    return out


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- InfoNCE -------------------------------------------------------------------------------------------
class _TiledInfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE with label smoothing eps over X = s * I @ T^T. With r_i, c_j the row and column
    log-sum-exps of X, torch's smoothed cross-entropy of row i is r_i - (1-eps) X_ii - eps/N sum_j X_ij, so

        L = (mean r + mean c) / 2 - (1-eps) mean_i X_ii - eps/N^2 (sum_i I_i) . (sum_j T_j) s

    and dL/dX = (softmax_rows + softmax_cols) / (2N) - (1-eps)/N Id - eps/N^2 1 1^T. Only the first part
    needs tiles; the identity and all-ones parts are applied to the features directly. A logit bias adds
    the same constant to every logit, which cross-entropy ignores: it changes neither value nor gradient.
    """

    @staticmethod
    def forward(ctx, image, text, scale, label_smoothing, chunk):
        n = image.shape[0]
        spans = _spans(n, chunk)
        limit = _shared_shift_limit(image.dtype)
        bufs = _Buffers(chunk, n, image)
        scaled = image * scale  # fold s into one side: each tile is then a single matmul
        row_lse = torch.full((n,), -math.inf, dtype=image.dtype, device=image.device)
        col_lse = torch.full_like(row_lse, -math.inf)
        shifts = [[None] * len(spans) for _ in spans]
        for bi, (r0, r1) in enumerate(spans):
            rows = scaled[r0:r1]
            for bj, (c0, c1) in enumerate(spans):
                tile = torch.mm(rows, text[c0:c1].T, out=bufs.get(0, r1 - r0, c1 - c0))
                shift = shifts[bi][bj] = _tile_shift(tile, limit)
                if shift is None:
                    row_part = torch.logsumexp(tile, 1)
                    col_part = torch.logsumexp(tile, 0)
                else:  # one exp() serves the row sums and the column sums
                    tile.sub_(shift).exp_()
                    row_part = tile.sum(1).log_().add_(shift)
                    col_part = tile.sum(0).log_().add_(shift)
                torch.logaddexp(row_lse[r0:r1], row_part, out=row_lse[r0:r1])
                torch.logaddexp(col_lse[c0:c1], col_part, out=col_lse[c0:c1])
        eps = label_smoothing
        diag = (image * text).sum(1).mean() * scale
        total = (image.sum(0) @ text.sum(0)) * scale / (n * n)
        loss = (row_lse.mean() + col_lse.mean()) / 2 - (1 - eps) * diag - eps * total
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.shifts, ctx.chunk, ctx.eps = shifts, chunk, eps
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        n, chunk, eps = image.shape[0], ctx.chunk, ctx.eps
        with torch.autocast(image.device.type, enabled=False):
            spans = _spans(n, chunk)
            bufs = _Buffers(chunk, n, image)
            scaled = image * scale
            g_rows = torch.zeros_like(image)  # (softmax part of dL/dX) @ T, unscaled
            g_text = torch.zeros_like(text)   # (softmax part of dL/dX)^T @ (s I)
            for bi, (r0, r1) in enumerate(spans):
                rows = scaled[r0:r1]
                for bj, (c0, c1) in enumerate(spans):
                    cols = text[c0:c1]
                    tile = torch.mm(rows, cols.T, out=bufs.get(0, r1 - r0, c1 - c0))
                    probs = bufs.get(1, r1 - r0, c1 - c0)
                    shift = ctx.shifts[bi][bj]
                    if shift is None:
                        torch.sub(tile, row_lse[r0:r1, None], out=probs).exp_()
                        probs.add_(tile.sub_(col_lse[None, c0:c1]).exp_())
                    else:  # exp(X - r_i) + exp(X - c_j) = exp(X - m) * (exp(m - r_i) + exp(m - c_j))
                        tile.sub_(shift).exp_()
                        torch.mul(tile, (shift - row_lse[r0:r1]).exp_()[:, None], out=probs)
                        probs.addcmul_(tile, (shift - col_lse[c0:c1]).exp_()[None, :])
                    g_rows[r0:r1].addmm_(probs, cols)
                    g_text[c0:c1].addmm_(probs.T, rows)
            # the identity and all-ones parts of dL/dX, then the 1/(2N) of the softmax part
            g_rows.mul_(1 / (2 * n)).sub_(text, alpha=(1 - eps) / n).sub_(text.sum(0), alpha=eps / (n * n))
            g_text.mul_(1 / (2 * n)).sub_(scaled, alpha=(1 - eps) / n).sub_(scaled.sum(0), alpha=eps / (n * n))
            d_scale = (image * g_rows).sum() * grad if ctx.needs_input_grad[2] else None
            d_image = g_rows.mul_(scale * grad) if ctx.needs_input_grad[0] else None
            d_text = g_text.mul_(grad) if ctx.needs_input_grad[1] else None
        return d_image, d_text, d_scale, None, None


def tiled_infonce(image: Tensor, text: Tensor, logit_scale: Scalar, logit_bias: Optional[Scalar] = None,
                  label_smoothing: float = 0.0, chunk_size: int = 2048) -> Tensor:
    """CLIP's symmetric InfoNCE, (CE(X, arange) + CE(X^T, arange)) / 2 with X = logit_scale * I @ T^T
    (+ logit_bias), torch's label smoothing, computed over ``chunk_size`` tiles. ``image``/``text``:
    [N, D], already normalised. Returns the mean loss as a 0-dim tensor.

    ``logit_bias`` is accepted for the same signature as the dense function; a constant added to every
    logit cancels in cross-entropy, so its gradient is exactly zero."""
    chunk = _check_chunk(chunk_size)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    image_, text_, scale, bias = _prepare(image, text, logit_scale, logit_bias)
    with torch.autocast(image_.device.type, enabled=False):
        loss = _TiledInfoNCE.apply(image_, text_, scale, float(label_smoothing), chunk)
    if bias is not None and bias.requires_grad:
        loss = loss + 0 * bias  # keep the bias in the graph so it gets its (zero) gradient
    return loss


# -- SigLIP --------------------------------------------------------------------------------------------
class _TiledSigLIP(torch.autograd.Function):
    """SigLIP over X = s * I @ T^T + b: L = -1/N sum_ij logsigmoid(z_ij X_ij), z = +1 on the diagonal and
    -1 elsewhere, i.e. L = (sum_ij softplus(X_ij) - sum_i X_ii) / N and dL/dX = (sigmoid(X) - Id) / N.
    The identity part goes straight to the features; the sigmoid part is accumulated tile by tile during
    the forward sweep (when a gradient is wanted), so backward only multiplies by the incoming gradient."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk, want_grad):
        n = image.shape[0]
        spans = _spans(n, chunk)
        bufs = _Buffers(chunk, n, image)
        scaled = image * scale
        # softplus(x) = log1p(exp(x)), which torch replaces by x above `threshold`; at 20 (float32) / 40
        # (float64) the dropped log1p(exp(-x)) is below the dtype's rounding, and exp(threshold) is finite
        threshold = 20.0 if image.dtype == torch.float32 else 40.0
        softplus_sum = torch.zeros((), dtype=torch.float64, device=image.device)  # N^2 terms: sum in f64
        if want_grad:
            g_rows, g_text = torch.zeros_like(image), torch.zeros_like(text)
            sig_sum = torch.zeros((), dtype=torch.float64, device=image.device)
        for r0, r1 in spans:
            rows = scaled[r0:r1]
            for c0, c1 in spans:
                cols = text[c0:c1]
                logits = torch.mm(rows, cols.T, out=bufs.get(0, r1 - r0, c1 - c0)).add_(bias)
                work = bufs.get(1, r1 - r0, c1 - c0)
                if want_grad:
                    sig = torch.sigmoid(logits, out=work)
                    sig_sum += sig.sum()
                    g_rows[r0:r1].addmm_(sig, cols)
                    g_text[c0:c1].addmm_(sig.T, rows)
                # out= keeps the chunk^2 temporary in the reused buffer (F.softplus would allocate one)
                softplus_sum += torch.ops.aten.softplus.out(logits, 1, threshold, out=work).sum()
        diag = (image * text).sum(1) * scale + bias
        loss = ((softplus_sum - diag.sum().double()) / n).to(image.dtype)
        if want_grad:
            g_rows.sub_(text).div_(n)      # (sigmoid(X) - Id) @ T / N
            g_text.sub_(scaled).div_(n)    # (sigmoid(X) - Id)^T @ (s I) / N
            d_scale = (image * g_rows).sum()
            d_bias = (sig_sum.to(image.dtype) - n) / n
            ctx.save_for_backward(g_rows.mul_(scale), g_text, d_scale, d_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        d_image, d_text, d_scale, d_bias = ctx.saved_tensors
        return d_image * grad, d_text * grad, d_scale * grad, d_bias * grad, None, None


def tiled_siglip(image: Tensor, text: Tensor, logit_scale: Scalar, logit_bias: Optional[Scalar],
                 chunk_size: int = 2048) -> Tensor:
    """SigLIP's pairwise sigmoid loss (open_clip ``SigLipLoss``, one process), -sum_ij logsigmoid(z_ij *
    (logit_scale * I_i . T_j + logit_bias)) / N with z = +1 on the diagonal and -1 elsewhere, computed over
    ``chunk_size`` tiles. ``image``/``text``: [N, D], already normalised. Returns a 0-dim tensor."""
    chunk = _check_chunk(chunk_size)
    image_, text_, scale, bias = _prepare(image, text, logit_scale, 0.0 if logit_bias is None else logit_bias)
    want_grad = _wants_grad(image_, text_, scale, bias)
    with torch.autocast(image_.device.type, enabled=False):
        return _TiledSigLIP.apply(image_, text_, scale, bias, chunk, want_grad)
