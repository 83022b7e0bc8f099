"""Checks of a loss family's options (``model.loss_args``), one wording for all of them.

A bad option is a configuration mistake: each message names the family, the option as the user writes
it in YAML, the rule and the value given, so the fix is in the error. Families call these both in their
module's ``__init__`` (fail at build time, before any data is read) and in their pure function (direct
callers get the same message).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def _option(family: str, name: str) -> str:
    return f"{family}: {name} (option model.loss_args.{name})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int, not an option value


def finite_number(family: str, name: str, value: Any, *, above: Optional[float] = None,
                  at_least: Optional[float] = None, below: Optional[float] = None, alternatives: str = "") -> None:
    """Raise unless ``value`` is a finite int or float (not a bool) within the given bounds.
    ``alternatives`` names what else the caller accepts (checked by the caller), e.g. ``" or 'prior'"``."""
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (below is None or value < below)
    if not ok:
        bounds = " and ".join(f"{op} {b:g}" for op, b in ((">", above), (">=", at_least), ("<", below))
                              if b is not None)
        rule = "a finite number" + (f" {bounds}" if bounds else "") + alternatives
        raise ValueError(f"{_option(family, name)} must be {rule}, got {value!r}")


def integer(family: str, name: str, value: Any, *, at_least: int) -> int:
    """``value`` as an int, or raise unless it is an integral number >= ``at_least``."""
    try:
        ok = int(value) == value and value >= at_least
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{_option(family, name)} must be an integer >= {at_least}, got {value!r}")
    return int(value)


def choice(family: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{family}: unknown {name} {value!r} (option model.loss_args.{name}); "
                         f"choose one of {tuple(choices)}")
