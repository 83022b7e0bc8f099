"""Shared pieces of the loss tests: one list of family configurations and a random `Embeddings` maker."""
from __future__ import annotations

import math

import torch

from lightning_clip.outputs import Embeddings

#: (registered name, build_loss options): every family and every mode
CASES = [
    ("infonce", {}),
    ("infonce", {"label_smoothing": 0.1}),
    ("siglip", {}),
    ("soft_targets", {"mode": "tutorial"}),
    ("soft_targets", {"mode": "fixed"}),
    ("multi_positive", {}),
    ("nce", {"num_negatives": 3}),
    ("dcl", {}),
    ("probabilistic", {"mode": "proposal"}),
    ("probabilistic", {"mode": "gaussian"}),
    ("sample_temperature", {}),
    ("sample_temperature", {"side": "candidate"}),
    ("damsm", {}),
    ("cyclip", {}),
    ("hn_nce", {}),
    ("cloob", {}),
    ("pcmepp", {}),
    ("pcmepp", {"vib_beta": 0.1}),
    ("filip", {}),
    ("meru", {}),
    # with replacement: any N (the generic tests run N = 1, 2); without, tests/test_negatives.py
    ("sampled_infonce", {"num_negatives": 3, "replacement": True}),
]


def case_id(case) -> str:
    name, kwargs = case
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


def word_mask_for(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Variable caption lengths 1..length, padding at the end."""
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    return torch.arange(length)[None, :] < lengths[:, None]


def random_embeddings(n: int = 6, dim: int = 8, dtype=torch.float64, seed: int = 0, regions: int = 5,
                      words: int = 6, groups: bool = True) -> Embeddings:
    """Every optional field filled: log-stds in [-0.5, 0.5], padded words, groups with duplicates."""
    g = torch.Generator().manual_seed(seed)
    emb = Embeddings(
        image=torch.randn(n, dim, generator=g, dtype=dtype),
        text=torch.randn(n, dim, generator=g, dtype=dtype),
        image_ln_std=torch.rand(n, generator=g, dtype=dtype) - 0.5,
        text_ln_std=torch.rand(n, generator=g, dtype=dtype) - 0.5,
        regions=torch.randn(n, regions, dim, generator=g, dtype=dtype),
        words=torch.randn(n, words, dim, generator=g, dtype=dtype),
        word_mask=word_mask_for(n, words, g),
    )
    if groups:  # pairs (0, 1), (2, 3)... share a group; one caption is also a duplicate of another image
        emb.image_groups = torch.arange(n) // 2
        emb.text_groups = torch.arange(n) // 2
    return emb


def finite_loss_and_grads(module, emb, autocast_dtype=None):
    """The loss, its terms and the gradients of every input and parameter are finite (optionally under
    CPU autocast); the loss itself is float32/64."""
    leaves = emb.map(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = module(leaves)
    assert out.loss.dtype in (torch.float32, torch.float64), f"loss computed in {out.loss.dtype}"
    assert torch.isfinite(out.loss), f"loss {out.loss}"
    for name, term in out.terms.items():
        assert torch.isfinite(term), f"term {name} = {term}"
    params = [p for p in module.parameters() if p.requires_grad]
    floats = [getattr(leaves, f) for f in ("image", "text", "image_ln_std", "text_ln_std", "regions", "words")
              if getattr(leaves, f) is not None]
    grads = torch.autograd.grad(out.loss, floats + params, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    return out


# -- brute force: plain Python loops over floats ---------------------------------------------------------
def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))
