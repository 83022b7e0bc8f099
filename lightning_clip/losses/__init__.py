"""Loss families. Importing this package registers every family (one file each)."""
from lightning_clip.losses._registry import LOSSES, build_loss, register_loss
from lightning_clip.losses.base import ContrastiveLoss
from lightning_clip.losses import infonce as _infonce  # noqa: F401  (registers "infonce")

__all__ = ["LOSSES", "build_loss", "register_loss", "ContrastiveLoss"]
