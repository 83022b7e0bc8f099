"""Loss families. Importing this package registers every family (one file each)."""
from lightning_clip.losses._registry import LOSSES, build_loss, register_loss
from lightning_clip.losses.base import ContrastiveLoss
# importing a family registers it
from lightning_clip.losses import (  # noqa: F401
    damsm as _damsm,
    dcl as _dcl,
    infonce as _infonce,
    multi_positive as _multi_positive,
    nce as _nce,
    probabilistic as _probabilistic,
    sigmoid as _sigmoid,
    soft_targets as _soft_targets,
)

__all__ = ["LOSSES", "build_loss", "register_loss", "ContrastiveLoss"]
