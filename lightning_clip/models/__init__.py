"""Towers and heads: the image tower (timm), the text tower (transformers), projection/variance heads."""
from lightning_clip.models.heads import ProjectionHead, VarianceHead
from lightning_clip.models.image_tower import ImageTower
from lightning_clip.models.text_tower import TextTower

__all__ = ["ImageTower", "TextTower", "ProjectionHead", "VarianceHead"]
