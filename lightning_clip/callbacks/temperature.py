"""The learned temperature, on every training step the logger writes: ``temperature/scale`` (the multiplier exp(log_scale)),
``temperature/log_scale`` (the raw parameter, which is what the optimiser moves and the clamp cuts) and
``temperature/bias`` (SigLIP-style families). Only what the family has is logged.

Worth watching because of two known failure modes: the scale climbing to the clamp (100) and, with
weight decay on it, sinking toward 1.
"""
from __future__ import annotations

import lightning as L

from lightning_clip.module import logging_step

KEYS = ("scale", "log_scale", "bias")


class TemperatureCallback(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = getattr(pl_module, "loss", None)
        if loss is None or not hasattr(loss, "scalars") or not logging_step(trainer):
            return
        values = loss.scalars()
        for key in KEYS:
            if key in values:
                # batch_size=1: nothing is averaged over an epoch (on_step only), and it spares Lightning
                # from guessing a batch size out of the meta dict
                pl_module.log(f"temperature/{key}", float(values[key]), on_step=True, on_epoch=False,
                              batch_size=1)
