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

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_clip.callbacks import default_callbacks
from lightning_clip.callbacks.results import FILENAME
from lightning_clip.data import ClipDataModule
from lightning_clip.module import ClipModule


def _share_cores(datamodule) -> None:
    """Give the training process the cores the loader workers leave free.

    Torch's default (one intra-op thread per core) plus the DataLoader workers oversubscribes a small
    machine: the training threads and the workers preempt each other on the same cores and every step
    waits for the slowest thread. A user's OMP_NUM_THREADS always wins.
    """
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    workers = getattr(datamodule, "num_workers", 0) or 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))


def _cheap_cuda_probe() -> None:
    """Stop every optimizer step from probing NVML on a machine without a GPU.

    torch's AdamW asks `torch.cuda.is_available()` on every step (its CUDA-graph capture check), and
    Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import, which makes each call load and initialise
    libnvidia-ml afresh: a visible share of every step on a CPU machine with a CUDA build of torch
    (BENCHMARKS.md). When NVML finds no GPU, the CUDA runtime's own count answers the same (0),
    caches it, and has no GPU context to carry into forked loader workers, which is what the NVML check
    is for; with a GPU nothing changes."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and not torch.cuda.is_available():
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


class RunLogger(TensorBoardLogger):
    """The run's TensorBoard logger, less two idle cards: Lightning's automatic ``epoch`` scalar (the step
    axis says where a run is; final_metrics.json keeps the epoch) and a counter while it is zero
    (``data/skipped``: a flat zero for any healthy run; logged from its first non-zero value on, and
    always in final_metrics.json, which reads the trainer's metrics, not the events)."""
    #: logged only once non-zero
    QUIET_WHILE_ZERO = ("data/skipped",)

    def log_metrics(self, metrics, step=None) -> None:
        metrics = {k: v for k, v in metrics.items()
                   if k != "epoch" and not (k in self.QUIET_WHILE_ZERO and float(v) == 0)}
        if metrics:
            super().log_metrics(metrics, step)


class ClipCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str, default="default",
                            help="name of the run group: runs go to runs/<experiment>/version_<n>")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="exact folder for this run's events, config and metrics (overrides --experiment)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="start over in a run folder that holds a run (final_metrics.json): its "
                                 "events, metrics and checkpoints are deleted first")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.pad_token_id", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        # `args` given from Python (tests, scripts) define the whole run; sys.argv then belongs to the
        # caller (pytest's own options), so Lightning's warning about having both is noise no user can act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def _logger(self) -> RunLogger:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("run_dir"):
            run_dir = os.path.normpath(cfg["run_dir"])
            # save_dir/name/version with an empty version is exactly run_dir
            return RunLogger(save_dir=os.path.dirname(run_dir) or ".", name=os.path.basename(run_dir),
                             version="", default_hp_metric=False)
        name = cfg.get("experiment") or "default"
        version = None  # the next version_<n>
        if cfg.get("ckpt_path") == "last":
            # resume the experiment's latest run instead of looking for a checkpoint in a new, empty one
            found = [int(p.name[8:]) for p in Path("runs", name).glob("version_*") if p.name[8:].isdigit()]
            version = max(found) if found else None
        return RunLogger(save_dir="runs", name=name, version=version, default_hp_metric=False)

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as e:
            # Lightning ends a SIGTERM'd run with SystemExit(None): exit 0, which a scheduler or the
            # ablation runner would take for a finished run (final_metrics.json exists after a validation)
            raise SystemExit(f"{subcommand} stopped by SIGTERM at global step {self.trainer.global_step}; "
                             "resume it with --ckpt_path=last") from e

    def before_fit(self) -> None:
        """Resume or refuse before anything is written: `--ckpt_path=last` resumes the run folder's
        checkpoints/last.ckpt (an error if there is none, or if the run already reached max_steps); a folder
        that holds a run (final_metrics.json) is not started over without `--overwrite=true`."""
        cfg = self.config[self.subcommand]
        logger = self.trainer.logger
        run_dir = Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None
        if run_dir is None:
            return
        metrics = run_dir / FILENAME
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise SystemExit(f"error: --ckpt_path=last: {run_dir} holds no checkpoints/last.ckpt to resume "
                                 "(a run keeps one unless trainer.enable_checkpointing=false); start a new run "
                                 "without --ckpt_path, or give --run_dir (or --experiment) of the run to resume")
            step = _finished_step(metrics)
            max_steps = self.trainer.max_steps
            if step is not None and max_steps is not None and 0 < max_steps <= step:
                raise SystemExit(f"error: --ckpt_path=last: the run in {run_dir} already reached step {step} "
                                 f"(trainer.max_steps={max_steps}); raise trainer.max_steps to train it further")
            self.config_init[self.subcommand]["ckpt_path"] = str(last)
        elif ckpt is None and metrics.exists():
            if not cfg.get("overwrite"):
                raise SystemExit(f"error: {run_dir} already holds a run ({FILENAME}, step "
                                 f"{_finished_step(metrics)}); resume it with --ckpt_path=last, start over in it "
                                 "with --overwrite=true, or choose another --run_dir")
            # start over: nothing of the previous run may mix with the new one's events and metrics
            for old in [metrics, *run_dir.glob("events.out.tfevents.*")]:
                old.unlink()
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        _share_cores(cfg.get("data"))
        _cheap_cuda_probe()
        trainer_cfg = cfg.get("trainer", {})
        kwargs["callbacks"] = list(trainer_cfg.get("callbacks") or []) + default_callbacks()
        if trainer_cfg.get("enable_checkpointing") is not False and not any(
                isinstance(c, ModelCheckpoint) for c in kwargs["callbacks"]):
            # Lightning's default checkpoint plus checkpoints/last.ckpt, which --ckpt_path=last resumes;
            # a link to the checkpoint just written, not a second write of it
            kwargs["callbacks"].append(ModelCheckpoint(save_last="link"))
        if trainer_cfg.get("logger") in (None, True):  # an explicit logger (or False) in the config wins
            kwargs["logger"] = self._logger()
        return super().instantiate_trainer(**kwargs)


def _finished_step(metrics: Path) -> Optional[int]:
    try:
        return int(json.loads(metrics.read_text()).get("step"))
    except (OSError, ValueError, TypeError):
        return None


def main(args=None):
    # `eval` is ours, not a Trainer entry point: the evaluation suite on a finished run's checkpoint
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["eval"]:
        from lightning_clip.eval.cli import eval_main

        return eval_main(argv[1:])
    # Nothing in the defaults touches a hub (timm pretrained=False, BERT built from a config), so no
    # offline switch is forced here: a user who names a hub model gets it downloaded as usual.
    return ClipCLI(ClipModule, ClipDataModule, args=args, save_config_kwargs={"overwrite": True})
