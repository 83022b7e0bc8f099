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
    """uint8 tensor ``[3, H, W]`` (or a PIL image) -> float tensor ``[3, S, S]``, normalised. Picklable
    (runs in DataLoader workers)."""

    def __init__(self, image_size: int = 64, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 augment: bool = False, crop_scale: tuple[float, float] = (0.8, 1.0)):
        self.image_size = image_size
        if augment:
            geometry = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        else:
            geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        self.geometry = v2.Compose(geometry)
        self.augment = augment
        # (x / 255 - mean) / std as one multiply-add per pixel, fused in place
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(3, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(3, 1, 1)

    def geometry_only(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """The resize/crop (or augmentation) alone: uint8 ``[3, S, S]``."""
        x = image if isinstance(image, torch.Tensor) else v2.functional.pil_to_tensor(image.convert("RGB"))
        if self.augment or x.shape[-2:] != (self.image_size, self.image_size):
            x = self.geometry(x)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, S, S]`` -> float32, normalised; keeps the memory format (channels_last
        batches stay channels_last). One call per batch costs a fraction of one call per image."""
        return x.to(torch.float32).mul_(self.scale).add_(self.shift)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry_only(image))
