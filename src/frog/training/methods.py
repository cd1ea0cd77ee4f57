"""Gradient approaches by name: the paper's ``bp``, ``fg-mean``, ``fg-sum``, ``frog``, and the baseline ``mezo``."""

from __future__ import annotations

from typing import Any

from ..estimator import ForwardGradient
from ..mezo import MeZO

AGGREGATION_OF = {"fg-mean": "mean", "fg-sum": "sum", "frog": "project"}
PAPER_METHODS = ("bp", *AGGREGATION_OF)  # those of frog approx / optimize: functions of a tensor
METHOD_NAMES = (*PAPER_METHODS, "mezo")


def check_method_name(method: str) -> None:
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")


def estimator_for(method: str, num_tangents: int, **options: Any) -> ForwardGradient | MeZO | None:
    """The estimator of ``method`` with k tangents, or None for ``bp`` (exact gradients).

    ``options`` go to :class:`ForwardGradient` (tangents, engine, seed, angle, ...). ``mezo`` is
    :class:`frog.mezo.MeZO` with k directions a step; of the options it takes ``seed`` and ``mezo_eps``.
    """
    check_method_name(method)
    if method == "bp":
        return None
    eps = options.pop("mezo_eps", 1e-3)
    if method == "mezo":
        return MeZO(eps=eps, directions=num_tangents, seed=options.get("seed", 0))
    return ForwardGradient(num_tangents, AGGREGATION_OF[method], **options)
