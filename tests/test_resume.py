"""Resume: a run restarted from its last checkpoint continues the training stream where it stopped (the
batches after the resume are the uninterrupted run's), and the CLI keeps last.ckpt, resumes it with
--ckpt_path=last and refuses to start over in a finished run folder unless asked."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip.data import synthetic as syn
from lightning_clip.module import ClipModule
from _data_helpers import small_dm
from _process import kill_group

TINY = dict(embed_dim=16, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
            image_size=32, warmup_steps=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("world"), num_train=40, num_val=8, seed=0, image_size=32)


class Keys(L.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(tuple(batch["meta"]["key"]))


def _fit(world, tmp_path, max_steps, workers, ckpt_path=None, save_every=None):
    dm = small_dm(world, batch_size=4, epoch_length=24, num_workers=workers, image_size=32)
    model = ClipModule(**TINY, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
    keys = Keys()
    callbacks = [keys]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=save_every))
    trainer = L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
                        default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return keys.keys


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(world, tmp_path, workers):
    # 6 batches per epoch; stopped after 7 steps (one into epoch 1, the odd worker's turn), resumed to 14
    full = _fit(world, tmp_path / "full", 14, workers)
    first = _fit(world, tmp_path / "cut", 7, workers, save_every=7)
    assert first == full[:7]
    resumed = _fit(world, tmp_path / "resumed", 14, workers, ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert len(resumed) == 7 and resumed == full[7:]


# ------------------------------------------------------------------------------------------------- CLI
def _cli(world, run, *extra):
    from lightning_clip import cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml",
                         f"--run_dir={run}", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                         f"--data.train_shards={world / 'train'}", f"--data.val_shards={world / 'val'}",
                         "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0", *extra])


def test_cli_keeps_last_ckpt_resumes_it_and_refuses_to_start_over(world, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    run = tmp_path / "run"
    _cli(world, run)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    before = (run / "final_metrics.json").read_text()
    assert json.loads(before)["step"] == 3

    with pytest.raises(SystemExit, match=r"already holds a run .*--ckpt_path=last.*--overwrite=true"):
        _cli(world, run)
    with pytest.raises(SystemExit, match=r"already reached step 3 \(trainer.max_steps=3\)"):
        _cli(world, run, "--ckpt_path=last")
    assert (run / "final_metrics.json").read_text() == before  # refused before writing anything

    resumed = _cli(world, run, "--ckpt_path=last", "--trainer.max_steps=5")
    assert resumed.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 5
    # where each part was trained: the first fit from step 0, the resumed one from step 3
    assert [f["start_step"] for f in json.loads((run / "environment.json").read_text())["fits"]] == [0, 3]

    with pytest.raises(SystemExit, match=r"holds no checkpoints/last.ckpt"):
        _cli(world, tmp_path / "empty", "--ckpt_path=last")

    _cli(world, run, "--overwrite=true")  # asked: starts over from step 0
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3
    assert [f["start_step"] for f in json.loads((run / "environment.json").read_text())["fits"]] == [0]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


class SigtermAtStep2(L.Callback):
    """What Lightning's SIGTERM handler does (sets the trainer's flag), at step 2."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            trainer._signal_connector.received_sigterm = True


def test_a_sigterm_ends_fit_with_a_nonzero_exit_that_says_how_to_resume(world, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    with pytest.raises(SystemExit) as stop:
        _cli(world, tmp_path / "run", "--trainer.max_steps=6", "--trainer.val_check_interval=1",
             "--trainer.callbacks+=test_resume.SigtermAtStep2")
    assert stop.value.code == "fit stopped by SIGTERM at global step 2; resume it with --ckpt_path=last"
    assert (tmp_path / "run" / "final_metrics.json").exists()  # why exit 0 would pass for a finished run


def test_sigterm_ends_a_run_whose_loader_never_delivers(world, tmp_path):
    # the training shard is a pipe that never sends a byte: the loader worker blocks, and so would the
    # main thread, deaf to Lightning's SIGTERM flag, without the prefetch thread's polling wait
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    pidfile, log = tmp_path / "pipe.pid", tmp_path / "fit.log"
    shard = f"pipe:sh -c 'echo $$ > {pidfile}; exec sleep 120'"
    # output to a file: the pipe's `sleep` inherits it and would hold a PIPE open after the run ends
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_clip", "fit", "--config", "experiments/base.yaml", "--config",
             "experiments/smoke.yaml", f"--run_dir={tmp_path / 'run'}", f"--data.train_shards={shard}",
             f"--data.val_shards={world / 'val'}", f"--data.tokenizer={world / 'tokenizer.json'}",
             "--data.image_size=32", "--data.num_workers=1", "--data.generate=null"],
            cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: see finally
    try:
        deadline = time.monotonic() + 120  # hang guards, not timings
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pidfile.exists(), log.read_text()[-3000:]
        time.sleep(1)  # let the main thread reach its wait for the first batch
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run did not end within 60 s of SIGTERM:\n" + log.read_text()[-3000:]) from None
        assert proc.returncode == 1, log.read_text()[-3000:]
        assert "fit stopped by SIGTERM at global step 0; resume it with --ckpt_path=last" in log.read_text()
    finally:
        # whatever is left of the run (on failure: its loader worker blocked on the pipe, the pipe's sleep)
        kill_group(proc)


class SigtermAtStep4(L.Callback):
    """SIGTERM after step 4, past the checkpoint of step 3's validation."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 4:
            trainer._signal_connector.received_sigterm = True


def test_a_resumed_runs_final_metrics_equal_the_uninterrupted_runs(world, tmp_path, monkeypatch):
    # every figure of final_metrics.json, running means included (train/false_negatives is a mean over
    # every training batch of the run, kept in the checkpoint)
    import json

    import shutil

    from webdataset import TarWriter

    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    # a validation set with one bad sample: data/skipped counts it at each validation, before and after
    # the resume (the count of the validations before it travels in the checkpoint)
    val = tmp_path / "val"
    shutil.copytree(world / "val", val)
    with TarWriter(str(val / "a-bad.tar"), encoder=False, mtime=0) as w:
        w.write({"__key__": "bad", "jpg": b"not an image", "txt": b"a red square"})
    args = ("--trainer.max_steps=6", "--trainer.log_every_n_steps=1", f"--data.val_shards={val}")
    _cli(world, tmp_path / "full", *args)
    with pytest.raises(SystemExit, match="stopped by SIGTERM at global step 4"):
        _cli(world, tmp_path / "cut", *args, "--trainer.callbacks+=test_resume.SigtermAtStep4")
    _cli(world, tmp_path / "cut", *args, "--ckpt_path=last")
    full, resumed = (json.loads((tmp_path / r / "final_metrics.json").read_text()) for r in ("full", "cut"))
    assert set(full) == set(resumed) and "train/false_negatives" in full and full["data/skipped"] == 2
    for key in set(full) - {"wall_time_s"}:
        assert resumed[key] == (full[key] if isinstance(full[key], str) else pytest.approx(full[key], rel=1e-6)), key
