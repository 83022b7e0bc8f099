"""`python -m lightning_clip fit --config experiments/base.yaml [--config CELL.yaml] [--x.y=z]`, and
`python -m lightning_clip eval --ckpt_path=RUN` (`lightning_clip.eval.cli`).

A LightningCLI subclass that
- links the tokenizer's vocabulary and the image size from the data module into the model,
- always adds the project's callbacks (cells must not touch `trainer.callbacks`: a list in a later config
  replaces the earlier one instead of merging),
- writes TensorBoard events, the config that ran and final_metrics.json into one run folder:
  `--run_dir` when given (the ablation runner uses runs/<ablation>/<cell>/seed_<k>), else
  runs/<experiment>/version_<n>.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_clip.callbacks import default_callbacks
from lightning_clip.data import ClipDataModule
from lightning_clip.module import ClipModule


def _share_cores(datamodule) -> None:
    """Give the training process the cores the loader workers leave free.

    Torch's default (one intra-op thread per core) plus the DataLoader workers oversubscribes a small
    machine: on 2 cores with 2 workers a step measured 4x slower than with one training thread. A user's
    OMP_NUM_THREADS always wins.
    """
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    workers = getattr(datamodule, "num_workers", 0) or 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))


class ClipCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str, default="default",
                            help="name of the run group: runs go to runs/<experiment>/version_<n>")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="exact folder for this run's events, config and metrics (overrides --experiment)")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.pad_token_id", apply_on="instantiate")

    def _logger(self) -> TensorBoardLogger:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("run_dir"):
            run_dir = os.path.normpath(cfg["run_dir"])
            # save_dir/name/version with an empty version is exactly run_dir
            return TensorBoardLogger(save_dir=os.path.dirname(run_dir) or ".", name=os.path.basename(run_dir),
                                     version="", default_hp_metric=False)
        return TensorBoardLogger(save_dir="runs", name=cfg.get("experiment") or "default", default_hp_metric=False)

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        _share_cores(cfg.get("data"))
        trainer_cfg = cfg.get("trainer", {})
        kwargs["callbacks"] = list(trainer_cfg.get("callbacks") or []) + default_callbacks()
        if trainer_cfg.get("logger") in (None, True):  # an explicit logger (or False) in the config wins
            kwargs["logger"] = self._logger()
        return super().instantiate_trainer(**kwargs)


def main(args=None):
    # `eval` is ours, not a Trainer entry point: the evaluation suite on a finished run's checkpoint
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["eval"]:
        from lightning_clip.eval.cli import eval_main

        return eval_main(argv[1:])
    # Nothing in the defaults touches a hub (timm pretrained=False, BERT built from a config), so no
    # offline switch is forced here: a user who names a hub model gets it downloaded as usual.
    return ClipCLI(ClipModule, ClipDataModule, args=args, save_config_kwargs={"overwrite": True})
