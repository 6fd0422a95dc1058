"""Checks and arithmetic shared by the architectures' config dataclasses."""
from __future__ import annotations

import math


def positive_ints(cfg: object, *names: str) -> None:
    """Raise naming the field when one of `names` is not a positive int (bools are not ints here)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)
