"""Argument checks shared by every estimator and setting: each raises a ValueError that names the
argument, what it must be and what it got (as ``torch.optim`` does for its hyperparameters)."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None, *, optional: bool = False) -> None:
    """ValueError unless ``value`` is an integer (not a bool) >= ``minimum`` (None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        tail = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer{bound}{tail}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a finite real number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
