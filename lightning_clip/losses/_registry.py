"""Name -> loss-module registry, filled by the ``@register_loss("name")`` decorator (timm's habit)."""
from __future__ import annotations

import inspect
from typing import Callable

LOSSES: dict[str, type] = {}


def register_loss(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is registered twice ({LOSSES[name].__name__}, {cls.__name__})")
        LOSSES[name] = cls
        cls.registry_name = name
        return cls

    return deco


def build_loss(name: str, **kwargs):
    """Instantiate a registered loss by name; unknown names and unknown options list the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (option model.loss); registered losses: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params or k == "self"]
    if unknown and not takes_any:
        valid = [k for k in params if k != "self"]
        raise TypeError(f"loss {name!r} got unknown option(s) {unknown} (option model.loss_args); "
                        f"valid options: {valid}")
    return cls(**kwargs)
