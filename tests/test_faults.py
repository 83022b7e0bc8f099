"""Hostile inputs and faults: damaged and odd shards, wrong settings, damaged checkpoints, two fits in one
run folder, a full disk. Each is either handled (converted, skipped and counted) or refused with one line
that names the option or file; none leaves a run folder that reads as finished when it is not."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from _process import kill_group

from lightning_clip.data import ClipDataModule
from lightning_clip.data import synthetic as syn
from lightning_clip.data.shards import DataWarning, ShardsNotFound, decode_image, expand_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("world"), num_train=40, num_val=8, seed=0, image_size=32)


def _png(mode16: bool = False) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if mode16:  # a 16-bit greyscale ramp: 0, 257, ..., 65535
        Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)).save(buf, format="PNG")
    else:
        Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, samples: list[tuple[str, dict]]) -> None:
    with TarWriter(str(path), encoder=False, mtime=0) as w:
        for key, files in samples:
            w.write({"__key__": key, **files})


def _val(d: Path, world: Path, **kw):
    dm = ClipDataModule(str(d), str(d), batch_size=4, num_workers=0, tokenizer=str(world / "tokenizer.json"),
                        image_size=16, **kw)
    dm.setup("validate")
    return dm, list(dm.val_dataloader())


# ------------------------------------------------------------------------------------------- data
def test_a_16_bit_image_is_scaled_to_8_bits_not_a_crash(tmp_path, world):
    image = decode_image(_png(mode16=True))
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert image[0, 0, :3].tolist() == [0, 1, 2] and int(image[0, -1, -1]) == 255  # top 8 bits
    _write(tmp_path / "s.tar", [("k0", {"png": _png(mode16=True), "txt": b"a grey ramp"}),
                                ("k1", {"png": _png(), "txt": b"a red square"})])
    dm, batches = _val(tmp_path, world)
    assert [k for b in batches for k in b["meta"]["key"]] == ["k0#0", "k1#0"] and dm.skipped == 0


def test_empty_validation_captions_are_dropped_with_a_warning_and_keep_the_ground_truth(tmp_path, world):
    scene = {"objects": [{"shape": "square", "color": "red", "size": "large", "position": "bottom middle"}]}
    info = [{"level": 1, "constraints": {"objects": [{"color": "red"}]}}] * 4
    meta = {"all_captions": ["a red thing", "", "   ", "a red square"], "captions": info, "scene": scene}
    _write(tmp_path / "s.tar", [("k0", {"png": _png(), "json": json.dumps(meta).encode()})])
    with pytest.warns(DataWarning, match=r"dropping 2 empty caption\(s\) of 4 in shard .*s.tar, key k0"):
        dm, batches = _val(tmp_path, world)
    meta = batches[0]["meta"]
    assert meta["key"] == ["k0#0", "k0#1"] and meta["caption"] == ["a red thing", "a red square"]
    # semantic recall and the ceiling need every row's ground truth
    assert all(c is not None for c in meta["constraints"]) and all(s is not None for s in meta["scene"])


def test_a_brace_pattern_with_missing_shards_is_an_error_that_counts_them(world):
    present = expand_shards(str(world / "val"))
    assert len(present) >= 1
    pattern = str(world / "val" / "shard-{000000..000009}.tar")
    with pytest.raises(ShardsNotFound, match=rf"names {10 - len(present)} shard\(s\) that do not exist"):
        expand_shards(pattern, "val_shards")
    assert isinstance(ShardsNotFound("x"), FileNotFoundError)


def test_duplicate_keys_in_a_shard_are_skipped_and_counted(tmp_path, world):
    _write(tmp_path / "s.tar", [("k0", {"png": _png(), "txt": b"a red square"}),
                                ("k1", {"png": _png(), "txt": b"a red square"}),
                                ("k0", {"png": _png(), "txt": b"another red square"})])
    with pytest.warns(DataWarning, match=r"s.tar, key k0: duplicate key"):
        dm, batches = _val(tmp_path, world)
    assert [k for b in batches for k in b["meta"]["key"]] == ["k0#0", "k1#0"] and dm.skipped == 1


# ------------------------------------------------------------------------------------------- CLI
def _args(world, run, *extra):
    return ["fit", "--config", "experiments/base.yaml", "--config", "experiments/smoke.yaml", f"--run_dir={run}",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", f"--data.train_shards={world / 'train'}",
            f"--data.val_shards={world / 'val'}", "--data.image_size=32", "--data.batch_size=8",
            "--data.num_workers=0", *extra]


def _cli(world, run, *extra):
    from lightning_clip import cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(_args(world, run, *extra))


def _refused(capsys, world, run, *extra) -> str:
    """The one stderr line of a refused fit (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        _cli(world, run, *extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-clip"])


#: (id, extra arguments, what the one line says); {tmp} and {world} are filled in
USER_ERRORS = [
    ("unknown-loss", ["--model.loss=nope"], r"unknown loss 'nope' \(option model.loss\)"),
    ("batch-size", ["--data.batch_size=0"], r"data.batch_size=0 must be >= 1"),
    ("zero-lr", ["--model.lr=0"], r"model.lr=0.0 must be > 0"),
    ("zero-max-steps", ["--trainer.max_steps=0"], r"trainer.max_steps=0 trains nothing"),
    ("negative-max-steps", ["--trainer.max_steps=-5"], r"max_steps"),
    ("no-train-batches", ["--trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0 trains nothing"),
    ("missing-ckpt", ["--ckpt_path={tmp}/none.ckpt"], r"--ckpt_path=.*none.ckpt: no such checkpoint"),
    ("yaml-syntax", ["--config", "{tmp}/bad.yaml"], r"--config .*bad.yaml, line 3, column \d+: YAML syntax error"),
    ("missing-shards", ["--data.val_shards={world}/val/shard-{{000000..000009}}.tar"], r"data.val_shards=.*do not exist"),
    ("run-dir-is-a-file", ["--run_dir={tmp}/afile"], r"--run_dir=.*afile is a file"),
]


@pytest.mark.parametrize("extra,message", [c[1:] for c in USER_ERRORS], ids=[c[0] for c in USER_ERRORS])
def test_user_errors_are_one_line_naming_the_option_with_exit_status_2(world, tmp_path, capsys, argv, extra,
                                                                        message):
    import re

    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 3\n   oops: [\n")
    line = _refused(capsys, world, tmp_path / "run", *[a.format(tmp=tmp_path, world=world) for a in extra])
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "final_metrics.json").exists()


def test_a_refusal_from_the_command_line_prints_no_traceback(world, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_clip", *_args(world, tmp_path / "run", "--model.lr=0")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: model.lr=0.0 must be > 0" in proc.stderr


def test_eval_on_the_command_line_names_a_missing_checkpoint_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_clip", "eval", f"--ckpt_path={tmp_path / 'none'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: --ckpt_path={tmp_path / 'none'} does not exist" in proc.stderr


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_damaged_checkpoint_is_named_and_the_run_folder_left_alone(world, tmp_path, capsys, argv, damage):
    run = tmp_path / "run"
    _cli(world, run)
    last = (run / "checkpoints" / "last.ckpt").resolve()
    raw = last.read_bytes()
    last.write_bytes(raw[:len(raw) // 2] if damage == "cut" else b"")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = _refused(capsys, world, run, "--ckpt_path=last", "--trainer.max_steps=5")
    assert str(run / "checkpoints" / "last.ckpt") in line and "not a readable checkpoint" in line
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "fit.lock"} == {k: v for k, v in before.items() if k != "fit.lock"}
    line = _refused(capsys, world, tmp_path / "other", f"--ckpt_path={last}")
    assert str(last) in line


def test_a_second_fit_in_a_run_folder_that_is_in_use_is_refused(world, tmp_path, capsys, argv):
    # the first fit waits forever for its training shard (a pipe that never sends a byte)
    run, pidfile, log = tmp_path / "run", tmp_path / "pipe.pid", tmp_path / "fit.log"
    shard = f"pipe:sh -c 'echo $$ > {pidfile}; exec sleep 120'"
    args = _args(world, run, f"--data.train_shards={shard}", f"--data.tokenizer={world / 'tokenizer.json'}",
                 "--data.generate=null")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lightning_clip", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pidfile.exists(), log.read_text()[-3000:]
        config = (run / "config.yaml").read_bytes()
        line = _refused(capsys, world, run, "--overwrite=true")
        assert f"another fit (pid {proc.pid}) is running" in line and str(run / "fit.lock") in line
        assert (run / "config.yaml").read_bytes() == config and len(list(run.glob("events.out.tfevents.*"))) <= 1
    finally:
        kill_group(proc)
    _cli(world, run, "--overwrite=true")  # the owner is gone (kill -9): the lock went with it
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3


def test_a_full_disk_never_leaves_a_run_that_looks_finished(world, tmp_path, argv, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        _cli(world, run)
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and message.startswith("error: fit failed to write ")
    assert str(run / "checkpoints") in message and "No space left on device" in message
    # what the ablation runner, the report and a resume look for: no final_metrics.json, no checkpoint
    assert not (run / "final_metrics.json").exists()
    assert json.loads((run / "final_metrics.unfinished.json").read_text())["step"] == 3
    assert not list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else True
    monkeypatch.undo()
    monkeypatch.setattr("sys.argv", ["lightning-clip"])
    with pytest.raises(SystemExit, match="already holds a run"):  # not started over by accident
        _cli(world, run)
    _cli(world, run, "--overwrite=true")
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3
    assert not (run / "final_metrics.unfinished.json").exists()


def test_a_full_disk_while_writing_the_metrics_names_the_file_and_leaves_no_finished_run(world, tmp_path, argv,
                                                                                      monkeypatch):
    fsync = os.fsync

    def no_space(fd):  # the disk fills after the run's environment record, at its first metrics
        if ".final_metrics.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space)  # atomic_write's: the metrics' temporary file cannot be made durable
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        _cli(world, run)
    assert stop.value.code not in (0, None)
    assert str(stop.value.code).startswith(f"error: fit failed to write {run / 'final_metrics.json'}")
    assert (run / "environment.json").exists()  # the write before the disk filled
    assert not (run / "final_metrics.json").exists() and not list(run.glob(".final_metrics.json.*"))
