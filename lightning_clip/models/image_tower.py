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
                 channels_last: bool = True, **model_args):
        super().__init__()
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
        # NHWC lets oneDNN (CPU) and cuDNN (tensor cores) pick their fast convolution kernels: timm's
        # test_resnet forward+backward at 64 px, batch 64, one CPU thread: 112 -> 82 ms
        # (benchmarks/tower_layout.py). Same maths; only 4-D weights change layout, so a ViT is unaffected
        # apart from its patch embedding.
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (pooled [N, C], regions [N, R, C])."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(images)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:  # CNN: [N, C, H, W] -> [N, H*W, C]
            regions = feats.flatten(2).transpose(1, 2)
        else:  # transformer: [N, prefix + P, C] -> patch tokens only
            regions = feats[:, self.num_prefix_tokens:]
        return pooled, regions
