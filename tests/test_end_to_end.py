"""The whole pipeline through the CLI on a tiny generated world: events with the issue's tags, the config
that ran saved beside them, and bad samples counted in `data/skipped` instead of vanishing."""
from __future__ import annotations

import json
import warnings

import pytest
import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_clip import cli
from lightning_clip.data.synthetic import generate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("world"), num_train=64, num_val=16, image_size=32, num_captions=2)
    # one undecodable image in an extra validation shard
    with wds.TarWriter(str(root / "val" / "zz-bad.tar")) as w:
        w.write({"__key__": "broken", "jpg": b"this is not a jpeg", "txt": "a red circle"})
    return root


def test_smoke_fit_logs_tags_saves_config_and_counts_skips(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml", f"--run_dir={run}",
                  "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1.0",
                  f"--data.train_shards={world / 'train'}", f"--data.val_shards={world / 'val'}",
                  "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0"])
    acc = EventAccumulator(str(run)).Reload()
    tags = set(acc.Tags()["scalars"])
    # smoke.yaml's own log_every_n_steps (not overridden here) writes the training scalars
    assert {"train/loss", "temperature/scale", "train/false_negatives", "val/loss", "data/skipped"} <= tags
    assert "train/logit_scale" not in tags  # one name per signal: temperature/scale
    assert {f"val/{d}/R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= tags
    assert (run / "config.yaml").is_file() and "loss: infonce" in (run / "config.yaml").read_text()
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["data/skipped"] == 1.0
    # the run's mean share of in-batch false negatives (the last logged value of the running mean)
    steps = [e.value for e in acc.Scalars("train/false_negatives")]
    assert len(steps) == 3 and final["train/false_negatives"] == pytest.approx(steps[-1])
    assert 0 <= final["train/false_negatives"] < 1
