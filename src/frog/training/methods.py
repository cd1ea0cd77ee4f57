"""Gradient approaches by the names the paper uses: ``bp``, ``fg-mean``, ``fg-sum``, ``frog``."""

from __future__ import annotations

from typing import Any

from ..estimator import ForwardGradient

AGGREGATION_OF = {"fg-mean": "mean", "fg-sum": "sum", "frog": "project"}
METHOD_NAMES = ("bp", *AGGREGATION_OF)


def check_method_name(method: str) -> None:
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")


def estimator_for(method: str, num_tangents: int, **options: Any) -> ForwardGradient | None:
    """The ForwardGradient of ``method`` with k tangents, or None for ``bp`` (exact gradients).

    ``options`` go to :class:`ForwardGradient` (tangents, engine, seed, angle, ...).
    """
    check_method_name(method)
    if method == "bp":
        return None
    return ForwardGradient(num_tangents, AGGREGATION_OF[method], **options)
