"""Plain gradient descent on a function of one tensor, with exact or forward gradients (SPEC 2.2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import NonFiniteError
from .estimator import ForwardGradient


@dataclass(frozen=True)
class DescentResult:
    """Outcome of :func:`gradient_descent`: best and last value, steps taken, whether it diverged."""

    best_value: float
    final_value: float
    steps: int
    diverged: bool


def exact_value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and its autograd gradient (the ``bp`` reference)."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(leaf)
        (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def gradient_descent(
    fn: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    lr: float,
    steps: int,
    estimator: ForwardGradient | None = None,
) -> DescentResult:
    """x_{t+1} = x_t - lr g_t for ``steps`` steps, g_t exact (estimator None) or a forward gradient.

    The best value is the smallest finite f(x_t), t = 0 .. steps. A non-finite value or gradient
    stops the run early with ``diverged=True``.
    """
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x = start.detach().clone()
    best = math.inf
    for step in range(steps):
        try:
            value, grad = exact_value_and_grad(fn, x) if estimator is None else estimator.value_and_grad(fn, x)
        except NonFiniteError:
            return DescentResult(best, math.nan, step, True)
        if not (math.isfinite(float(value)) and bool(torch.isfinite(grad).all())):
            return DescentResult(best, float(value), step, True)
        best = min(best, float(value))
        x -= lr * grad
    with torch.no_grad():
        final = float(fn(x))
    return DescentResult(min(best, final), final, steps, not math.isfinite(final))
