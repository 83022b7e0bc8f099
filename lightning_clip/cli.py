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

from lightning_clip import environment
from lightning_clip.callbacks import default_callbacks
from lightning_clip.callbacks.results import FILENAME
from lightning_clip.data import ClipDataModule
from lightning_clip.data.shards import ShardsNotFound
from lightning_clip.module import ClipModule
from lightning_clip.runfolder import (UNFINISHED, RunFolderLock, UserError, check_checkpoint, mark_unfinished,
                                      write_error)

#: Lightning's own names for --ckpt_path, not files
_CKPT_NAMES = ("last", "best", "hpc", "registry")


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


class _Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that a checkpoint whose write fails (a full disk) is removed
    and the error names its path: a partial file must not be taken for a checkpoint."""

    @property
    def state_key(self) -> str:  # the parent's: checkpoints keep resuming across this subclass
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            if trainer.is_global_zero:
                Path(filepath).unlink(missing_ok=True)
            if e.filename is None:
                raise OSError(e.errno, e.strerror or str(e), filepath) from e
            raise


def _yaml_syntax(args: list[str]) -> None:
    """Name the file and line of a YAML syntax error in a --config file (the parser reads the file's text
    and reports it as "<unicode string>")."""
    import yaml

    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            continue  # the parser reports a missing file itself
        try:
            with open(path, encoding="utf-8") as f:
                for _ in yaml.parse(f, Loader=yaml.SafeLoader):  # syntax only: no tags are constructed
                    pass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"--config {path}{where}: YAML syntax error: "
                            f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None


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
            if args is None or isinstance(args, (list, tuple)):
                _yaml_syntax([str(a) for a in (sys.argv[1:] if args is None else args)])
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads an explicit checkpoint's hyperparameters first: a damaged file is named here
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in _CKPT_NAMES:
            check_checkpoint(Path(ckpt))
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        # the configured values are checked as the model, data module and trainer are built: an error
        # raised here is the user's input (the option names itself in the message), not a bug
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            super().instantiate_classes()
        except (ValueError, OSError, MisconfigurationException) as e:
            raise UserError(str(e).strip() or type(e).__name__) from e

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
        except ShardsNotFound as e:  # data.*_shards, expanded when the data is set up
            raise UserError(str(e)) from e
        except Exception as e:
            failed = write_error(e)
            if failed is None or subcommand != "fit":
                raise
            # a run is finished only when everything it writes is written: the metrics of a run whose
            # checkpoint (or metrics) could not be written must not read as a finished run's
            run_dir = self._run_dir()
            moved = mark_unfinished(run_dir, FILENAME) if run_dir is not None and self.trainer.is_global_zero else None
            raise SystemExit(f"error: fit failed to write {failed.filename or 'a file'} at global step "
                             f"{self.trainer.global_step}: {failed.strerror or failed}"
                             + (f"; the run is not finished ({FILENAME} moved to {moved.name})" if moved else "")
                             + "; free space, then resume with --ckpt_path=last") from e
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()

    def _run_dir(self) -> Optional[Path]:
        logger = self.trainer.logger
        return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None

    def before_fit(self) -> None:
        """Resume or refuse before anything is written: `--ckpt_path=last` resumes the run folder's
        checkpoints/last.ckpt (an error if there is none, or if the run already reached max_steps); a folder
        that holds a run (final_metrics.json) is not started over without `--overwrite=true`."""
        cfg = self.config[self.subcommand]
        _refuse_idle(self.trainer)
        ckpt = cfg.get("ckpt_path")
        run_dir = self._run_dir()
        if run_dir is None:
            return
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--run_dir={run_dir} is a file, not a folder; choose another --run_dir")
        if _launch_rank() == 0:  # DDP's other processes write nothing here and must not take the lock
            self._lock = RunFolderLock(run_dir).acquire()
        metrics = run_dir / FILENAME
        if ckpt == "last":  # (an explicit checkpoint file was checked when the arguments were parsed)
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise UserError(f"error: --ckpt_path=last: {run_dir} holds no checkpoints/last.ckpt to resume "
                                "(a run keeps one unless trainer.enable_checkpointing=false); start a new run "
                                "without --ckpt_path, or give --run_dir (or --experiment) of the run to resume")
            step = _finished_step(metrics)
            max_steps = self.trainer.max_steps
            if step is not None and max_steps is not None and 0 < max_steps <= step:
                raise UserError(f"error: --ckpt_path=last: the run in {run_dir} already reached step {step} "
                                f"(trainer.max_steps={max_steps}); raise trainer.max_steps to train it further")
            check_checkpoint(last, "--ckpt_path=last")
            self.config_init[self.subcommand]["ckpt_path"] = str(last)
        elif ckpt is None and (metrics.exists() or (run_dir / UNFINISHED).exists()):
            held = metrics if metrics.exists() else run_dir / UNFINISHED
            if not cfg.get("overwrite"):
                raise UserError(f"error: {run_dir} already holds a run ({held.name}, step "
                                f"{_finished_step(held)}); resume it with --ckpt_path=last, start over in it "
                                "with --overwrite=true, or choose another --run_dir")
            # start over: nothing of the previous run may mix with the new one's events and metrics
            for old in [metrics, run_dir / UNFINISHED, run_dir / environment.FILENAME,
                        *run_dir.glob("events.out.tfevents.*")]:
                old.unlink(missing_ok=True)
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
            kwargs["callbacks"].append(_Checkpoint(save_last="link"))
        if trainer_cfg.get("logger") in (None, True):  # an explicit logger (or False) in the config wins
            kwargs["logger"] = self._logger()
        return super().instantiate_trainer(**kwargs)


def _launch_rank() -> int:
    """This process' global rank as its launcher set it (Lightning's DDP launcher, torchrun, SLURM), before
    the trainer's strategy knows it; 0 for a single process."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(var, "0").isdigit() and int(os.environ.get(var, "0")) > 0:
            return int(os.environ[var])
    return 0


def _refuse_idle(trainer) -> None:
    """Settings under which a fit would train nothing and still exit 0."""
    for option, value in (("trainer.max_steps", trainer.max_steps), ("trainer.max_epochs", trainer.max_epochs),
                          ("trainer.limit_train_batches", trainer.limit_train_batches)):
        if value == 0:
            raise UserError(f"{option}=0 trains nothing; give a positive value (trainer.max_steps=-1 with "
                            "trainer.max_epochs for a run bounded by epochs)")


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

        try:
            return eval_main(argv[1:])
        except FileNotFoundError as e:
            if args is not None:  # called from Python: the caller handles the exception
                raise
            # on the command line a missing checkpoint, config or split is the user's input, not a bug
            print(UserError(str(e)), file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    # Nothing in the defaults touches a hub (timm pretrained=False, BERT built from a config), so no
    # offline switch is forced here: a user who names a hub model gets it downloaded as usual.
    try:
        return ClipCLI(ClipModule, ClipDataModule, args=args, save_config_kwargs={"overwrite": True})
    except UserError as e:  # one line, no traceback: the input is wrong, not the code
        print(e, file=sys.stderr, flush=True)
        raise
