"""Gradient approaches by name: the paper's ``bp``, ``fg-mean``, ``fg-sum``, ``frog``, and the baselines
``mezo`` (zeroth order) and ``local`` (greedy local learning)."""

from __future__ import annotations

from typing import Any

from ..checks import check_choice
from ..estimator import ForwardGradient
from ..interface import GradientEstimator
from ..local import LocalLearning
from ..mezo import MeZO

AGGREGATION_OF = {"fg-mean": "mean", "fg-sum": "sum", "frog": "project"}
PAPER_METHODS = ("bp", *AGGREGATION_OF)  # those of frog approx / optimize: functions of a tensor
METHOD_NAMES = (*PAPER_METHODS, "mezo", "local")


def check_method_name(method: str) -> None:
    check_choice("method", method, METHOD_NAMES)


def estimator_for(method: str, num_tangents: int, **options: Any) -> GradientEstimator | None:
    """The estimator of ``method`` with k tangents, or None for ``bp`` (exact gradients).

    ``options`` go to :class:`ForwardGradient` (tangents, engine, seed, angle, ...). ``mezo`` is
    :class:`frog.mezo.MeZO` with k directions a step; of the options it takes ``seed`` and ``mezo_eps``.
    ``local`` is :class:`frog.local.LocalLearning`; of the options it takes ``guess`` and ``blocks``.
    """
    check_method_name(method)
    if method == "bp":
        return None
    eps = options.pop("mezo_eps", 1e-3)
    if method == "mezo":
        return MeZO(eps=eps, directions=num_tangents, seed=options.get("seed", 0))
    if method == "local":
        return LocalLearning(options["guess"], blocks=options.get("blocks"))
    return ForwardGradient(num_tangents, AGGREGATION_OF[method], **options)
