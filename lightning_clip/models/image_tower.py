"""Image tower: any timm model, returning a pooled feature and its region features.

Regions are what DAMSM attends over: the patch tokens of a ViT (prefix tokens dropped) or the cells of a
CNN's last feature map. Both come out of the same `forward_features` call, so asking for them costs nothing.
"""
from __future__ import annotations

import timm
import torch
from torch import Tensor, nn


class ImageTower(nn.Module):
    def __init__(self, name: str = "test_vit", pretrained: bool = False, image_size: int | None = None,
                 channels_last: bool = True, autocast: str | None = None, **model_args):
        super().__init__()
        if autocast not in (None, "bf16"):
            raise ValueError(f"unknown image tower autocast {autocast!r} (option model.image_autocast); "
                             "choose null (the trainer's precision) or 'bf16'")
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm image model {name!r} (option model.image_model); "
                             f"similar registered names: {close or 'none'}; see timm.list_models()")
        kwargs = dict(pretrained=pretrained, num_classes=0, **model_args)
        if image_size is not None:
            # ViTs need the input size at build time (position embeddings); CNNs take any size.
            kwargs["img_size"] = image_size
        try:
            self.model = timm.create_model(name, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            kwargs.pop("img_size")  # a CNN constructor that rejects the keyword
            self.model = timm.create_model(name, **kwargs)
        self.num_features = self.model.num_features
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        # NHWC lets oneDNN (CPU) and cuDNN (tensor cores) pick their fast convolution kernels (figures:
        # BENCHMARKS.md, benchmarks/tower_layout.py). Same maths; only 4-D weights change layout, so a ViT
        # is unaffected apart from its patch embedding.
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # bf16 for this tower alone, whatever the trainer's precision: on a CPU with AVX512-BF16 (or AMX)
        # oneDNN's bf16 convolutions speed up the tiny CNN's forward+backward, while the small text
        # tower's matmuls get *slower* under autocast (cast overhead on tiny ops), so the default CPU
        # configuration runs fp32 everywhere except here (figures: BENCHMARKS.md,
        # benchmarks/tower_precision.py).
        self.autocast = autocast

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (pooled [N, C], regions [N, R, C])."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast == "bf16":
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                feats = self.model.forward_features(images)
                pooled = self.model.forward_head(feats, pre_logits=True)
            # heads, variance heads and losses see float32, as under a 32-bit trainer
            feats, pooled = feats.float(), pooled.float()
        else:
            feats = self.model.forward_features(images)
            pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # CNN: [N, C, H, W] -> [N, H*W, C]
            regions = feats.flatten(2).transpose(1, 2)
        else:  # transformer: [N, prefix + P, C] -> patch tokens only
            regions = feats[:, self.num_prefix_tokens:]
        return pooled, regions
