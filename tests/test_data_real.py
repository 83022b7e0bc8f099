"""Real photographs: Flickr8k shards from ../shared (skipped with the reason when absent)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml

from lightning_clip.data import ClipDataModule


@pytest.fixture(scope="module")
def flickr(shared_dir):
    root = shared_dir / "data" / "flickr8k-96"
    if not (root / "train").is_dir():
        pytest.skip(f"Flickr8k shards absent at {root}: see data/README.md to build them")
    return root


@pytest.fixture(scope="module")
def real_dm(flickr, tmp_path_factory):
    dm = ClipDataModule(str(flickr / "train"), str(flickr / "val"), batch_size=16, val_batch_size=250,
                        num_workers=2, image_size=96, epoch_length=32,
                        tokenizer_cache=str(tmp_path_factory.mktemp("tokenizers")))
    dm.setup("fit")
    return dm


def test_flickr8k_reads_with_a_trained_wordpiece(real_dm):
    dm = real_dm
    assert 2000 <= dm.vocab_size <= 4000 and dm.pad_token_id == 0
    # a word-level vocabulary: common words are single tokens
    assert dm.tokenizer.tokenize("A dog runs through the grass .") == ["a", "dog", "runs", "through", "the",
                                                                       "grass", "."]
    keys, images = Counter(), set()
    for b in dm.val_dataloader():
        keys.update(b["meta"]["key"])
        images.update(b["meta"]["image_id"].tolist())
        assert b["image"].shape[1:] == (3, 96, 96)
        assert (b["meta"]["specificity"] == -1).all() and (b["meta"]["num_objects"] == -1).all()
        assert b["meta"]["scene"][0] is None and b["meta"]["constraints"][0] is None
    assert len(keys) == 5000 and max(keys.values()) == 1 and len(images) == 1000
    assert dm.skipped == 0
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (16, 3, 96, 96) and b["input_ids"].shape == (16, 32)


def test_flickr8k_config_points_at_the_shards(repo_root, flickr):
    cfg = yaml.safe_load((repo_root / "experiments/real/flickr8k.yaml").read_text())
    assert (repo_root / cfg["data"]["train_shards"]).resolve() == (flickr / "train").resolve()
    assert (repo_root / cfg["data"]["val_shards"]).resolve() == (flickr / "val").resolve()


def test_short_training_on_flickr8k(real_dm, tmp_path):
    module = pytest.importorskip("lightning_clip.module")
    import lightning as L

    model = module.ClipModule(image_size=96, vocab_size=real_dm.vocab_size, pad_token_id=real_dm.pad_token_id,
                              embed_dim=32, image_model_args={"patch_size": 16}, warmup_steps=1,
                              text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1})
    trainer = L.Trainer(max_steps=4, limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None,
                        logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=real_dm)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
