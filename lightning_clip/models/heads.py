"""Projection heads into the shared embedding space, and per-sample log-std (variance) heads."""
from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """`linear` is CLIP's head (a single matrix, no bias); `mlp` is the tutorial's
    Linear-GELU-Linear with a residual and LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown head {kind!r} (option model.head); choose 'linear' or 'mlp'")
        self.kind = kind
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        if kind == "mlp":
            self.fc = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim))
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.kind == "mlp":
            x = self.norm(x + self.fc(x))
        return x


class VarianceHead(nn.Module):
    """Predicts ln(std) per sample (seed 000's W_std). Starts at exactly 0 (std = 1) so that the
    probabilistic loss begins as a plain distance-based InfoNCE and the variance is learned from there."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)
