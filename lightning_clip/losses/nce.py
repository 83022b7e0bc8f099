"""Negative sampling as in word2vec (Mikolov et al. 2013; seed 002's "noise contrastive estimation"
section): each positive pair is a binary problem against k sampled negatives instead of a softmax over
the whole batch.

For image i (and, mirrored, for caption i) with k negatives j_1..j_k drawn uniformly from the *other*
items of the (global) batch, with replacement by default (``replacement=False``: k distinct items)::

    z_ij = s * I_i . T_j + b
    l_i = -log sigmoid(z_ii) - sum_m log sigmoid(-z_{i j_m})      (binary cross-entropy with logits)
    L = (mean_i l_i^{I->T} + mean_i l_i^{T->I}) / 2

Relation to siglip, which sums every off-diagonal pair once: L_siglip = (1/N) [sum_i softplus(-z_ii) +
sum_{i != j} softplus(z_ij)]. Here each anchor sums its k negatives and the two directions are averaged,
so E[L] = (1/N) [sum_i softplus(-z_ii) + k/(N-1) sum_{i != j} softplus(z_ij)]: siglip with its negative
term weighted by k/(N-1). With ``replacement=False`` and k = N - 1 every other item is drawn exactly once
in each direction and L *equals* siglip's loss at the same s and b (tests/test_negatives.py).

The scale s and bias b are learned (init 10 and -ln k: a positive is one in k + 1 candidates, so the
prior log-odds are -ln k). The sampler is a `torch.Generator`, seeded, on the CPU: every rank draws the
same global [N, k] indices and keeps its own rows, so distributed training samples exactly what one
process would on the concatenated batch. With N = 1 there is nothing to sample and only the positive
term remains. `NegativeSampler` (shared with sampled_softmax.py) owns the generator: its seed, what
validation draws, and the state a checkpoint keeps.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clip.losses._inputs import check_pair, full_precision, normalize
from lightning_clip.losses._options import integer
from lightning_clip.losses._registry import register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses.distributed import split_rows
from lightning_clip.outputs import Embeddings, LossOutput

Seed = Union[int, str, None]


def sample_negatives(n: int, k: int, generator: Optional[torch.Generator] = None, replacement: bool = True,
                     *, family: str = "nce", clamp_to_batch: bool = False) -> Tensor:
    """``[2, n, k]`` indices: for each direction and each anchor i, k draws from {0..n-1} \\ {i}.

    ``replacement=False``: k *distinct* items per anchor, which needs k <= n - 1 (else a ValueError naming
    num_negatives and the batch size, or, with ``clamp_to_batch``, all n - 1 others); with k = n - 1 every
    other item is a negative exactly once, in a random order."""
    if not replacement and k > n - 1:
        if not clamp_to_batch:
            raise ValueError(
                f"{family}: num_negatives (option model.loss_args.num_negatives) = {k} distinct negatives "
                f"(replacement: false) need a global batch of at least {k + 1} items, got a batch of {n}; "
                f"lower num_negatives, raise data.batch_size, or set replacement: true")
        k = n - 1
    if n < 2 or k == 0:
        return torch.empty(2, n, 0, dtype=torch.long)
    device = generator.device if generator is not None else torch.device("cpu")
    if replacement:  # the historical draw, kept call for call so that a seed gives the same indices as before
        r = torch.randint(0, n - 1, (2, n, k), generator=generator, device=device)
        anchor = torch.arange(n, device=device)[None, :, None]
        return (r + (r >= anchor)).cpu()  # skip the anchor itself
    # The k largest of n i.i.d. uniforms are a uniformly random k-subset in a random order; the anchor's
    # own entry is set below every uniform so it is never among them (k <= n - 1). 2 n^2 draws per step:
    # 8k at N = 64, 2M at N = 1024 (a few ms); far larger batches would want Floyd's O(n k) algorithm.
    noise = torch.rand(2, n, n, generator=generator, device=device)
    noise.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    return noise.topk(k, dim=-1).indices.cpu()


def run_seed() -> int:
    """The run's seed as Lightning's ``seed_everything`` records it (``PL_GLOBAL_SEED``, set before the
    model is built and inherited by every DDP rank); 0 when nothing set it (a bare script, a test)."""
    value = os.environ.get("PL_GLOBAL_SEED")
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"seed='run' reads the run's seed from PL_GLOBAL_SEED, which holds {value!r}, "
                         f"not an integer") from None


def seed_option(family: str, seed: Seed) -> Seed:
    """``"run"``, None or an integer >= 0 (returned as int); otherwise a ValueError naming the option."""
    if seed is None or seed == "run":
        return seed
    try:
        return integer(family, "seed", seed, at_least=0)
    except ValueError:
        raise ValueError(f"{family}: seed (option model.loss_args.seed) must be 'run' (the run's seed), an "
                         f"integer >= 0 (a fixed seed) or null (torch's global RNG), got {seed!r}") from None


class NegativeSampler(nn.Module):
    """The seeded CPU generator behind a family's negatives.

    ``seed``: ``"run"`` derives the generator's seed from the run's (`run_seed`) at the first training
    forward, so two run seeds draw different negatives while every rank of one run draws the same global
    indices; an int is a fixed seed whatever the run's; None draws from torch's global RNG.

    Validation (``training=False``) draws from a generator of its own, seeded afresh at every call: the
    training stream does not depend on how often or on how many batches validation runs (DDP ranks with
    unequal validation batches would otherwise leave with different generator states and stop drawing
    the same global indices), and two checkpoints' validation losses use the same negatives. Its last,
    short batch may hold fewer than k + 1 items: without replacement it then uses all N - 1 others.

    The training generator's state is saved with the module (``get_extra_state``), so a resumed run
    continues the stream where the checkpoint left it; a checkpoint written before this state existed
    loads without it, and the sampler then re-seeds at the first forward.
    """

    def __init__(self, family: str, seed: Seed):
        super().__init__()
        self.seed = seed_option(family, seed)
        self.resolved_seed: Optional[int] = None  # the integer the training generator was seeded with
        self._generator: Optional[torch.Generator] = None

    def current_seed(self) -> int:
        """The seed the training generator has (or will get at its first draw)."""
        if self.resolved_seed is not None:
            return self.resolved_seed
        return run_seed() if self.seed == "run" else self.seed

    def generator(self, training: bool) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if not training:
            return torch.Generator().manual_seed(self.current_seed())
        if self._generator is None:
            self.resolved_seed = self.current_seed()
            self._generator = torch.Generator().manual_seed(self.resolved_seed)
        return self._generator

    def get_extra_state(self) -> dict:
        return {"seed": self.resolved_seed,
                "state": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        if state and state.get("state") is not None and self.seed is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["state"])
            self.resolved_seed = state["seed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys and key not in state_dict:
            missing_keys.remove(key)  # a checkpoint from before the sampler kept its state: re-seed instead

    def extra_repr(self) -> str:
        return f"seed={self.seed!r}"


def _num_negatives(k, family: str = "nce") -> int:
    return integer(family, "num_negatives", k, at_least=0)


def _replacement(value, family: str = "nce") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{family}: replacement (option model.loss_args.replacement) must be true or false, "
                         f"got {value!r}")
    return value


def _binary_rows(anchor: Tensor, paired: Tensor, keys: Tensor, negatives: Tensor, scale, bias) -> Tensor:
    positive = scale * (anchor * paired).sum(-1) + bias                        # [B]
    negative = scale * torch.einsum("bd,bkd->bk", anchor, keys[negatives]) + bias  # [B, k]
    return (F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


@full_precision
def nce_terms(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
              generator: Optional[torch.Generator] = None, logit_bias=None, replacement: bool = True,
              clamp_to_batch: bool = False, normalize_inputs: bool = False,
              gathered: bool = False) -> dict[str, Tensor]:
    """``{"i2t", "t2i"}``: image anchors against sampled captions and caption anchors against images.
    ``clamp_to_batch``: without replacement, a batch of N <= k uses its N - 1 others (validation)."""
    check_pair("nce", image, text)
    num_negatives = _num_negatives(num_negatives)
    replacement = _replacement(replacement)
    if normalize_inputs:
        image, text = normalize(image), normalize(text)
    rows = split_rows(image, text, gathered)
    bias = 0.0 if logit_bias is None else logit_bias
    b = rows.image.shape[0]
    idx = sample_negatives(len(rows.image_all), num_negatives, generator, replacement,
                           clamp_to_batch=clamp_to_batch).to(image.device)
    idx = idx[:, rows.offset: rows.offset + b]
    # the partner of a local anchor is local too
    return {"i2t": _binary_rows(rows.image, rows.text, rows.text_all, idx[0], logit_scale, bias),
            "t2i": _binary_rows(rows.text, rows.image, rows.image_all, idx[1], logit_scale, bias)}


def nce(image: Tensor, text: Tensor, logit_scale, *, num_negatives: int,
        generator: Optional[torch.Generator] = None, logit_bias=None, replacement: bool = True) -> Tensor:
    """Negative-sampling loss over L2-normalised ``[N, D]`` features; ``logit_scale`` = exp(log_scale)."""
    terms = nce_terms(image, text, logit_scale, num_negatives=num_negatives, generator=generator,
                      logit_bias=logit_bias, replacement=replacement)
    return (terms["i2t"] + terms["t2i"]) / 2


@register_loss("nce")
class NCELoss(ContrastiveLoss):
    """Logs ``i2t`` and ``t2i``. ``seed``: ``"run"`` (default) follows the run's seed, an int is fixed, None
    uses torch's global RNG (`NegativeSampler`). ``replacement``: draw negatives with replacement (default,
    the historical sampler) or k distinct ones."""

    def __init__(self, num_negatives: int = 5, init_scale: float = 10.0, learn_scale: bool = True,
                 init_bias: Optional[float] = None, learn_bias: bool = True, seed: Seed = "run",
                 replacement: bool = True):
        num_negatives = _num_negatives(num_negatives)
        super().__init__(init_scale=init_scale, learn_scale=learn_scale,
                         init_bias=-math.log(max(num_negatives, 1)) if init_bias is None else init_bias,
                         learn_bias=learn_bias)
        self.num_negatives = num_negatives
        self.replacement = _replacement(replacement)
        self.sampler = NegativeSampler("nce", seed)

    def forward(self, emb: Embeddings) -> LossOutput:
        terms = nce_terms(emb.image, emb.text, self.logit_scale, num_negatives=self.num_negatives,
                          generator=self.sampler.generator(self.training), logit_bias=self.bias.float(),
                          replacement=self.replacement, clamp_to_batch=not self.training,
                          normalize_inputs=True, gathered=True)
        return LossOutput((terms["i2t"] + terms["t2i"]) / 2, terms)
