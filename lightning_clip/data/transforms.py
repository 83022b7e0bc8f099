"""Image transforms: resize (shorter side) + centre crop + normalise; augmentation off by default.

Horizontal flips are deliberately not offered: synthetic captions name positions ("top left"), and a
flip would make them false.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

# CLIP's image statistics (open_clip OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """PIL image -> float tensor ``[3, S, S]``, normalised. Picklable (runs in DataLoader workers)."""

    def __init__(self, image_size: int = 64, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 augment: bool = False, crop_scale: tuple[float, float] = (0.8, 1.0)):
        self.image_size = image_size
        if augment:
            geometry = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        else:
            geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        self.geometry = v2.Compose(geometry)
        self.augment = augment
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = v2.functional.pil_to_tensor(image)  # uint8 [3, H, W]
        if self.augment or x.shape[-2:] != (self.image_size, self.image_size):
            x = self.geometry(x)
        return self.normalize(x.to(torch.float32).div_(255.0))
