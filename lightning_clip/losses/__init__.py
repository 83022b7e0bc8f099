"""Loss families. Importing this package registers every family (one file each)."""
from lightning_clip.losses._registry import LOSSES, build_loss, register_loss
from lightning_clip.losses.base import ContrastiveLoss
# importing a family registers it
from lightning_clip.losses import (  # noqa: F401
    cloob as _cloob,
    cyclip as _cyclip,
    damsm as _damsm,
    dcl as _dcl,
    filip as _filip,
    gcl as _gcl,
    hn_nce as _hn_nce,
    infonce as _infonce,
    meru as _meru,
    multi_positive as _multi_positive,
    nce as _nce,
    pcmepp as _pcmepp,
    probabilistic as _probabilistic,
    sample_temperature as _sample_temperature,
    sampled_softmax as _sampled_softmax,
    sigmoid as _sigmoid,
    soft_targets as _soft_targets,
)

__all__ = ["LOSSES", "build_loss", "register_loss", "ContrastiveLoss"]
