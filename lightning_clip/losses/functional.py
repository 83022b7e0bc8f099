"""The pure loss functions, for tools that want tensors in and a 0-dim mean loss out.

``image``/``text`` are ``[N, D]``; where a family works on the unit sphere (infonce, siglip, dcl,
multi_positive, nce, soft_targets "fixed", cyclip, hn_nce, cloob, gcl) they must already be L2-normalised, as
in open_clip; so must filip's tokens. pcmepp and probabilistic use their means as given; meru takes the raw,
unnormalised features (its scale alpha and the exponential map place them on the hyperboloid).
``logit_scale`` is the multiplier exp(log_scale). Every function runs in float32 (float64 stays float64)
with autocast off, and rejects empty, mismatched or non-finite input with a ValueError.
"""
from lightning_clip.losses.cloob import cloob
from lightning_clip.losses.cyclip import cyclip
from lightning_clip.losses.damsm import damsm
from lightning_clip.losses.dcl import dcl
from lightning_clip.losses.filip import filip
from lightning_clip.losses.gcl import gcl
from lightning_clip.losses.hn_nce import hn_nce
from lightning_clip.losses.infonce import infonce
from lightning_clip.losses.meru import meru
from lightning_clip.losses.multi_positive import multi_positive
from lightning_clip.losses.nce import nce
from lightning_clip.losses.pcmepp import pcmepp
from lightning_clip.losses.probabilistic import probabilistic
from lightning_clip.losses.sigmoid import siglip
from lightning_clip.losses.soft_targets import soft_targets

__all__ = ["cloob", "cyclip", "damsm", "dcl", "filip", "gcl", "hn_nce", "infonce", "meru", "multi_positive", "nce",
           "pcmepp", "probabilistic", "siglip", "soft_targets"]
