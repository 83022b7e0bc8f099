"""``final_metrics.json`` in the run folder, the loss family in TensorBoard's HPARAMS tab, and which machine
setup trained the run (``environment.json``, `lightning_clip.environment`; a resumed fit appends its own).

The JSON is a flat dict of the last value of every logged metric (``trainer.callback_metrics``) plus
``step``, ``epoch``, ``wall_time_s`` and ``loss_family``; the ablation table reads it. It is rewritten
after each validation and at the end of fit, atomically (`lightning_clip.files.atomic_write`), so a run
killed mid-write never leaves half a file for the table to trip on.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_clip import environment
from lightning_clip.files import atomic_write

FILENAME = "final_metrics.json"
#: scalar tags the HPARAMS tab shows next to each run's settings
HPARAM_METRICS = ("val/t2i/R@1", "val/i2t/R@1", "val/t2i/R@5", "val/i2t/R@5", "val/semantic/t2i/R@1",
                  "val/semantic/i2t/R@1", "val/loss")
#: set to "report" by the ablation runner: the ablation's report writes this run's HPARAMS session (the
#: factors the ablation varies, lightning_clip/report/tensorboard.py), so the run writes none of its own
#: (TensorBoard shows the first session a run holds)
HPARAMS_ENV = "LIGHTNING_CLIP_HPARAMS"


def run_dir(trainer) -> str:
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return log_dir or trainer.default_root_dir


def _number(value: Any) -> Optional[float]:
    v = float(value)
    return v if math.isfinite(v) else None  # strict JSON has no NaN / inf


def flatten_hparams(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested hparams as ``a/b`` keys with values TensorBoard accepts (number, str, bool)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:  # None, lists, tuples, objects
            out[name] = str(value)
    return out


class ResultsCallback(L.Callback):
    def __init__(self, filename: str = FILENAME):
        self.filename = filename
        self._t0: Optional[float] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._t0 = time.monotonic()

    # -- hparams ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's own hparams call (made between on_fit_start and on_train_start), so this
        # session description is the one TensorBoard shows.
        if trainer.is_global_zero and os.environ.get(HPARAMS_ENV) != "report":
            self.log_hparams(trainer, pl_module)
        if trainer.is_global_zero:  # here, not in setup: a fit that fails its checks trained nowhere
            environment.record(run_dir(trainer), step=trainer.global_step, world_size=trainer.world_size,
                               device=trainer.strategy.root_device)

    @staticmethod
    def hparams_of(pl_module) -> dict[str, Any]:
        hp = dict(getattr(pl_module, "hparams", {}) or {})
        loss = getattr(pl_module, "loss", None)
        hp["loss"] = hp.get("loss") or getattr(loss, "registry_name", None)
        hp["loss_args"] = hp.get("loss_args") or {}
        return flatten_hparams(hp)

    def log_hparams(self, trainer, pl_module) -> None:
        """Write the HPARAMS session (settings + which scalar tags are its metrics) without logging any
        metric value: ``logger.log_hyperparams(params, metrics)`` would also write those metrics as scalars
        at step 0, a fake first point on every recall curve. The tab reads the values from the scalar tags
        the other callbacks log."""
        from torch.utils.tensorboard.summary import hparams

        params = self.hparams_of(pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                exp, ssi, sei = hparams(params, {k: 0.0 for k in HPARAM_METRICS})
                writer = logger.experiment._get_file_writer()  # as TensorBoardLogger.log_hyperparams does
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)

    # -- final_metrics.json ------------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def collect(self, trainer, pl_module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in sorted(trainer.callback_metrics.items()):
            if getattr(value, "numel", lambda: 1)() == 1:
                out[key] = _number(value)
        loss = getattr(pl_module, "loss", None)
        out.update(step=int(trainer.global_step), epoch=int(trainer.current_epoch),
                   wall_time_s=round(time.monotonic() - (self._t0 or time.monotonic()), 3),
                   loss_family=getattr(loss, "registry_name", None))
        return out

    def write(self, trainer, pl_module) -> Optional[str]:
        if not trainer.is_global_zero:
            return None
        path = os.path.join(run_dir(trainer), self.filename)
        atomic_write(path, json.dumps(self.collect(trainer, pl_module), indent=2, sort_keys=True) + "\n")
        return path
