"""`python -m lightning_clip eval --ckpt_path=RUN/checkpoints/last.ckpt [--out=RUN/eval.json]`.

Loads the checkpoint with the configuration its run saved beside it (``RUN/config.yaml``), embeds the
run's validation data (or ``--split=test``, or ``--data.val_shards=...``), runs every measure of
`lightning_clip.eval.suite`, and writes ``eval.json`` (a list of CLIP_benchmark-style records) plus the
same scalars to TensorBoard in the run folder (tags ``eval/...``, at the checkpoint's step).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_clip.files import atomic_write
from lightning_clip.runfolder import find_checkpoint

#: how many training images the linear probes are fitted on (CLIP_benchmark fits on a dataset's train split)
PROBE_IMAGES = 2000


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint file, run folder) from a checkpoint path or a run folder (`runfolder.find_checkpoint`)."""
    p = find_checkpoint(path)
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p, run


def _eval_shards(data_cfg: dict, split: str, override: Optional[str]) -> str:
    if override:
        return override
    val = Path(data_cfg.get("val_shards", "data/synthetic/val"))
    if split == "val":
        return str(val)
    test = val.parent / "test"
    if not test.exists() and (val.parent / "generator.json").exists():
        from lightning_clip.data.synthetic import ensure_test_split

        print(f"adding the test split of the synthetic world {val.parent}", file=sys.stderr)
        ensure_test_split(val.parent)
    if not test.exists():
        raise FileNotFoundError(f"--split=test: {test} does not exist (the data has no test split); give "
                                "--data.val_shards=<test shards>")
    return str(test)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lightning_clip eval", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint file or a run folder")
    p.add_argument("--out", type=Optional[str], default=None, help="eval.json path (default: RUN/eval.json)")
    p.add_argument("--split", type=str, default="val", choices=["val", "test"],
                   help="the run's validation data, or the held-out test split beside it")
    p.add_argument("--data.val_shards", type=Optional[str], default=None, help="evaluate on these shards instead")
    p.add_argument("--probe_images", type=int, default=PROBE_IMAGES,
                   help="training images the linear probes are fitted on (0: no probes)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--tensorboard", type=bool, default=True, help="also write the scalars to RUN's TensorBoard")
    return p


def evaluate_checkpoint(ckpt_path: str, out: Optional[str] = None, split: str = "val",
                        val_shards: Optional[str] = None, probe_images: int = PROBE_IMAGES,
                        batch_size: int = 256, tensorboard: bool = True) -> tuple[Path, list[dict]]:
    from lightning_clip.data import ClipDataModule
    from lightning_clip.data.shards import expand_shards
    from lightning_clip.data.transforms import ImageTransform
    from lightning_clip.eval.embed import embed_images, embed_split
    from lightning_clip.eval.records import flatten
    from lightning_clip.eval.suite import evaluate_split
    from lightning_clip.module import ClipModule

    ckpt, run = resolve_checkpoint(ckpt_path)
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: eval rebuilds the data from the config the run saved")
    cfg = yaml.safe_load(cfg_path.read_text())
    data_cfg = dict(cfg.get("data") or {})
    data_cfg.pop("class_path", None)
    data_cfg = data_cfg.get("init_args", data_cfg)
    shards = _eval_shards(data_cfg, split, val_shards)
    dm = ClipDataModule(**{**data_cfg, "val_shards": shards, "num_workers": 0, "val_batch_size": batch_size,
                           "generate": None})
    dm.setup("validate")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = ClipModule.load_from_checkpoint(str(ckpt), map_location=device).eval()
    step = int(torch.load(str(ckpt), map_location="cpu", weights_only=False).get("global_step", 0))

    split_emb = embed_split(module, dm.val_dataloader())

    def text_embed_fn(prompts: list[str]) -> torch.Tensor:
        tok = dm.tokenizer(prompts, padding="max_length", truncation=True, max_length=dm.max_length,
                           return_tensors="pt")
        with torch.no_grad():
            return module.encode_text(tok["input_ids"], tok["attention_mask"]).cpu()

    probe_train = None
    if split_emb.scenes is not None and probe_images > 0:
        transform = ImageTransform(dm.image_size, dm.mean, dm.std)
        probe_train = embed_images(module, expand_shards(dm.train_shards, "train_shards"), transform,
                                   limit=probe_images, batch_size=batch_size)
    dataset = f"{Path(shards).parent.name}/{Path(shards).name}"
    records = evaluate_split(split_emb, dataset=dataset, model=str(run), pretrained=str(ckpt),
                             similarity=getattr(module.loss, "similarity", None), text_embed_fn=text_embed_fn,
                             probe_train=probe_train)
    out_path = Path(out) if out else run / ("eval.json" if split == "val" else f"eval_{split}.json")
    atomic_write(out_path, json.dumps(records, indent=1) + "\n")  # the report never reads half an eval.json
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run)) as w:
            for tag, value in flatten(records).items():
                w.add_scalar(tag if split == "val" else tag.replace("eval/", f"eval_{split}/", 1), value, step)
    return out_path, records


def eval_main(argv: Optional[list[str]] = None) -> Path:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out, records = evaluate_checkpoint(a.ckpt_path, a.out, a.split, a.data.val_shards, a.probe_images,
                                       a.batch_size, a.tensorboard)
    from lightning_clip.eval.records import TABLE_KEYS, flatten

    flat = flatten(records)
    shown = ", ".join(f"{k.split('/', 1)[1]} {flat[k]:.3f}" for k in TABLE_KEYS if k in flat)
    print(f"wrote {out} ({len(records)} records, {time.perf_counter() - t0:.0f} s): {shown}")
    return out
