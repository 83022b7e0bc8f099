"""Scaling the training run: mixed precision and data parallelism must not change what is learned.

- bf16-mixed runs end to end on CPU and the loss stays float32 (the module takes it outside autocast).
- Two gloo ranks, each holding half of every global batch, end with the same weights as one process
  on the whole batches: the losses gather features with gradient (lightning_clip/losses/distributed.py),
  so the DDP-averaged gradient is the single-process gradient of the concatenated batch.
"""
from __future__ import annotations

import copy
import json
import math
import warnings

import lightning as L
import pytest
import torch

from lightning_clip.module import ClipModule

VOCAB, LENGTH, SIZE = 100, 12, 32
# test_vit, not test_resnet: BatchNorm normalises with per-rank batch statistics, so two ranks of B
# would not match one process of 2B; LayerNorm is per-sample. Dropout 0 so both runs draw nothing.
TINY = dict(loss="infonce", image_model="test_vit", image_model_args={"patch_size": 8}, image_size=SIZE,
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
            vocab_size=VOCAB, pad_token_id=0, embed_dim=16, lr=1e-3, warmup_steps=1)


class SGDClip(ClipModule):
    """ClipModule with plain SGD. Adam divides by sqrt(v): a gradient that is zero in exact arithmetic
    (the attention key bias; softmax ignores a per-row constant) is float noise whose sign Adam turns into
    a full lr-sized step, different on every reduction order. SGD keeps the comparison about gradients."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fixed_batches(n: int, size: int, seed: int = 0) -> list[dict]:
    """`n` global batches of `size` items in the batch layout of CONTRACTS.md (only what infonce reads)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(1, VOCAB, (size, LENGTH), generator=g)
        lengths = torch.randint(3, LENGTH + 1, (size,), generator=g)
        mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        out.append({"image": torch.randn(size, 3, SIZE, SIZE, generator=g), "input_ids": ids * mask,
                    "attention_mask": mask, "meta": {"key": [f"{b}/{i}" for i in range(size)]}})
    return out


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {"image": batch["image"][lo:hi], "input_ids": batch["input_ids"][lo:hi],
            "attention_mask": batch["attention_mask"][lo:hi], "meta": {"key": batch["meta"]["key"][lo:hi]}}


class FixedBatches(L.LightningDataModule):
    """The same global batches in the same order for any world size: rank r of W takes items
    r*B:(r+1)*B of each global batch of W*B (no sampler, no shuffling)."""

    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        size = self.batches[0]["image"].shape[0]
        if size % world:
            raise ValueError(f"global batch {size} does not split over {world} ranks")
        per = size // world
        mine = [_slice(b, rank * per, (rank + 1) * per) for b in self.batches]
        return torch.utils.data.DataLoader(mine, batch_size=None)


def fit(module: ClipModule, batches: list[dict], **trainer_kwargs) -> ClipModule:
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, **trainer_kwargs)
    with warnings.catch_warnings():
        # these fits have no validation on purpose (limit_val_batches=0): Lightning's notice is noise
        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`")
        trainer.fit(module, datamodule=FixedBatches(batches))
    return module


# -- mixed precision -----------------------------------------------------------------------------------------
def test_bf16_mixed_fit_through_the_cli(tmp_path, monkeypatch):
    from lightning_clip import cli
    from lightning_clip.data.synthetic import generate

    shards = generate(tmp_path / "data", num_train=64, num_val=16, image_size=32, num_captions=2)
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["lightning-clip"])  # LightningCLI warns when pytest's argv is also there
    cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml",
              f"--run_dir={run}", "--trainer.precision=bf16-mixed", "--trainer.max_steps=2",
              "--trainer.limit_train_batches=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
              f"--data.train_shards={shards / 'train'}", f"--data.val_shards={shards / 'val'}",
              "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0",
              "--model.image_model=test_resnet", "--model.image_model_args={}"])
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 2
    assert final["train/loss"] is not None and math.isfinite(final["train/loss"])


def test_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    module = ClipModule(**TINY)
    batch = fixed_batches(1, 6)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = module(batch)
        out = module._compute_loss(emb)
    assert emb.image.dtype == torch.bfloat16 and emb.text.dtype == torch.bfloat16  # autocast did act
    assert out.loss.dtype == torch.float32
    # the same float32 loss as outside autocast on the same (upcast) embeddings
    reference = module._compute_loss(emb.map(lambda t: t.float()))
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)


# -- data parallelism ----------------------------------------------------------------------------------------
@pytest.mark.slow  # two spawned interpreters importing torch, lightning and transformers
@pytest.mark.distributed
def test_two_ranks_match_one_process_on_the_same_global_batches():
    torch.manual_seed(0)
    start = SGDClip(**TINY)
    batches = fixed_batches(3, 8)  # 3 steps, global batch 8: 4 per rank
    single = fit(copy.deepcopy(start), batches, devices=1)
    # ddp_spawn: Lightning loads rank 0's final weights back into this process' module
    ddp = fit(copy.deepcopy(start), batches, devices=2, strategy="ddp_spawn")
    moved = 0
    for (name, a), b, s in zip(single.state_dict().items(), ddp.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(a, s))
    # the comparison means something only if training changed the weights
    assert moved > len(start.state_dict()) // 2
