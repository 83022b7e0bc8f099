"""A frozen teacher for `ClipModule` (`model.teacher`): a finished ClipModule run whose towers give the soft
targets of ``soft_targets`` with ``targets="teacher"``, as the pretrained towers of seed 001's tutorial did.

The teacher is held outside the student's module tree (`TeacherHolder`), so it has no parameters in the
student's optimizer, no keys in its state dict or checkpoint, and no `train()` call ever reaches it; the
student's checkpoint keeps only the teacher's path (a hyperparameter), and loading it loads the teacher
again from there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_clip.runfolder import find_checkpoint


def load_teacher(cls: Any, path: str, student_hparams: Any, option: str = "model.teacher") -> nn.Module:
    """The ``cls`` (ClipModule, passed in: module.py imports this file) saved at ``path``, with its own
    hyperparameters from the checkpoint, on the CPU, in eval mode, every parameter frozen. Refuses what
    cannot work: an unreadable checkpoint, one that is not a ClipModule's, and a teacher whose text tower
    reads another vocabulary (its token ids would mean other words) or whose images have another size."""
    ckpt = find_checkpoint(path, option, "; train the teacher first (a .ckpt file or a run folder)")
    try:
        teacher = cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch and Lightning raise many kinds for a bad file
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ValueError(f"{option}={path}: {ckpt} is not a readable ClipModule checkpoint "
                         f"({type(e).__name__}: {detail})") from e
    mine, theirs = student_hparams, teacher.hparams
    for key, why in (("vocab_size", "its token ids would name other words"),
                     ("pad_token_id", "it would read padding as words"),
                     ("image_size", "it was trained on images of another size")):
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"{option}={path}: the teacher's {key} is {theirs.get(key)!r}, this model's "
                             f"{mine.get(key)!r}; {why}. A teacher must have been trained on data with the "
                             "same tokenizer and image size (the same data options, another world seed)")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class TeacherHolder:
    """Holds the teacher without making it a submodule (a plain object: `nn.Module.__setattr__` registers
    only modules, parameters and buffers). It follows the student's device and dtype on first use."""

    def __init__(self, module: nn.Module):
        self.module = module

    @torch.no_grad()
    def features(self, batch: dict, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(image, text)`` ``[N, D_teacher]`` L2-normalised float features of ``batch``, without gradient,
        on ``like``'s device."""
        t = self.module
        first = next(t.parameters())
        if first.device != like.device:
            t.to(like.device)  # once: Lightning moved the student after building it
        if t.training:
            t.eval()  # nothing should switch it, but dropout in a teacher would make the targets noisy
        images = batch["image"].to(dtype=first.dtype)
        pooled_i, _ = t._image_features({**batch, "image": images})
        pooled_t, _, _ = t.text_tower(batch["input_ids"], batch["attention_mask"])
        return (F.normalize(t.image_head(pooled_i).float(), dim=-1),
                F.normalize(t.text_head(pooled_t).float(), dim=-1))
