"""Two CPU processes (gloo) each hold half of a batch; every family, trained through a tiny DDP-wrapped
projection, gets the same loss (mean over ranks) and the same parameter gradients as one process on the
concatenated batch (float64, 1e-6 relative). One spawn runs every family, to stay within a few seconds."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _gloo import leave_together
from _loss_helpers import CASES, case_id, word_mask_for
from lightning_clip.losses import build_loss
from lightning_clip.outputs import Embeddings

N, DIN, DIM, REGIONS, WORDS, WORLD = 8, 6, 4, 5, 7, 2
RTOL = 1e-6
#: every family, plus settings that need this test's N = 8: k distinct negatives of the global batch
DDP_CASES = CASES + [("nce", {"num_negatives": 3, "replacement": False}),
                     ("sampled_infonce", {"num_negatives": 5, "replacement": False})]


class Tiny(nn.Module):
    """A shared projection for every feature and, when the family asks, a log-std head; plus the loss."""

    def __init__(self, case):
        super().__init__()
        torch.manual_seed(0)
        self.loss = build_loss(case[0], **case[1])
        self.proj = nn.Linear(DIN, DIM)
        self.std = nn.Linear(DIN, 1) if "image_ln_std" in self.loss.needs else None

    def forward(self, raw: dict):
        emb = Embeddings(self.proj(raw["image"]), self.proj(raw["text"]))
        if self.std is not None:
            emb.image_ln_std = self.std(raw["image"]).squeeze(-1) * 0.3
            emb.text_ln_std = self.std(raw["text"]).squeeze(-1) * 0.3
        if "regions" in self.loss.needs:
            emb.regions, emb.words, emb.word_mask = self.proj(raw["regions"]), self.proj(raw["words"]), raw["word_mask"]
        if "groups" in self.loss.needs:
            emb.image_groups, emb.text_groups = raw["groups"], raw["groups"]
        return self.loss(emb).loss


def full_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(N, DIN, generator=g, dtype=torch.float64),
            "text": torch.randn(N, DIN, generator=g, dtype=torch.float64),
            "regions": torch.randn(N, REGIONS, DIN, generator=g, dtype=torch.float64),
            "words": torch.randn(N, WORDS, DIN, generator=g, dtype=torch.float64),
            "word_mask": word_mask_for(N, WORDS, g),
            # duplicates inside a rank and across ranks (items 3 and 4 sit on different ranks)
            "groups": torch.tensor([0, 0, 1, 2, 2, 3, 4, 0])}


def shard(batch: dict, rank: int) -> dict:
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    out = {k: v[rows] for k, v in batch.items()}
    # trim padding to this rank's longest caption: ranks then hold different word lengths
    longest = int(out["word_mask"].sum(1).max())
    out["words"], out["word_mask"] = out["words"][:, :longest], out["word_mask"][:, :longest]
    return out


def loss_and_grads(model: nn.Module, loss: torch.Tensor) -> dict:
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.detach().clone() for n, p in model.named_parameters()
                                      if p.grad is not None}}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        batch = shard(full_batch(), rank)
        for case in DDP_CASES:
            model = Tiny(case).double()
            ddp = nn.parallel.DistributedDataParallel(model)
            results[case_id(case)] = loss_and_grads(model, ddp(batch))
        del ddp, model  # the DDP reducers hold the group: gone before it is destroyed
        results["options"] = options_under_ddp(batch)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_together(out_dir, rank, WORLD)


def options_under_ddp(batch: dict) -> dict:
    """Options that depend on the process group: siglip's prior bias (-ln of the *global* batch) and
    multi_positive's oracle mode (refused: the relevance covers only the local batch)."""
    out = {}
    emb = Embeddings(batch["image"][:, :DIM], batch["text"][:, :DIM])
    siglip = build_loss("siglip", init_bias="prior").double()
    siglip(emb)
    out["siglip_bias"] = float(siglip.bias)
    oracle = build_loss("multi_positive", positives="oracle").double()
    emb.relevance = torch.eye(emb.batch_size, dtype=torch.bool)
    try:
        oracle(emb)
        out["oracle_error"] = None
    except ValueError as e:
        out["oracle_error"] = str(e)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", DDP_CASES, ids=case_id)
def test_two_ranks_equal_one_process(per_rank, case):
    model = Tiny(case).double()
    single = loss_and_grads(model, model(full_batch()))
    ranks = [r[case_id(case)] for r in per_rank]
    assert set(ranks[0]) == set(single), f"parameters with gradients differ: {set(ranks[0]) ^ set(single)}"
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert relative_error(mean_loss, single["loss"]) <= RTOL, (mean_loss, single["loss"])
    for name in single:
        if name == "loss":
            continue
        for rank, r in enumerate(ranks):  # DDP leaves the same averaged gradient on every rank
            err = relative_error(r[name], single[name])
            assert err <= RTOL, f"{name} on rank {rank}: relative error {err:.1e}"


def test_siglip_prior_bias_uses_the_global_batch(per_rank):
    for r in per_rank:  # N = 8 over both ranks, not the local 4
        assert r["options"]["siglip_bias"] == pytest.approx(-math.log(N), rel=1e-12)


def test_oracle_targets_refuse_ddp_with_a_clear_error(per_rank):
    for r in per_rank:
        msg = r["options"]["oracle_error"]
        assert msg is not None and "positives='oracle'" in msg and "DDP" in msg and "positives='groups'" in msg
