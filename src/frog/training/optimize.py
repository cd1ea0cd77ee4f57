"""Plain gradient descent on a function of one tensor, with exact or forward gradients (the paper's Sec. 4.2;
docs/reproducing.md, "Closed-form optimization")."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError
from ..estimator import ForwardGradient
from .strategies import extra_forward_passes, make_optimizer, take_step


@dataclass(frozen=True)
class DescentResult:
    """Outcome of :func:`gradient_descent`: best and last value, steps taken, whether it diverged."""

    best_value: float
    final_value: float
    steps: int
    diverged: bool
    extra_forward_passes: int = 0  # used by the strategy itself (the line search), over all steps


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
    lr: float | None,
    steps: int,
    estimator: ForwardGradient | None = None,
    *,
    optimizer: str = "sgd",
    on_step: Callable[[int, float], None] | None = None,
) -> DescentResult:
    """Descent from ``start`` for ``steps`` steps along g_t, exact (estimator None) or a forward gradient.

    ``optimizer`` is a strategy of :mod:`frog.training.strategies`; ``sgd`` is x_{t+1} = x_t - lr g_t, and
    ``lr`` None takes the strategy's default. The best value is the smallest finite f(x_t),
    t = 0 .. steps. A non-finite value or gradient stops the run early with ``diverged=True``.
    ``on_step(t, best)`` is called after each evaluation (it may raise to stop the run).
    """
    if lr is not None and not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x = start.detach().clone()
    # plain SGD stays x -= lr g (torch.optim.SGD's fused add rounds differently: the published numbers)
    strategy = None if optimizer == "sgd" else make_optimizer(optimizer, [x], lr)
    if strategy is None and lr is None:
        make_optimizer("sgd", [x], lr)  # the error that says where a step size comes from
    best = math.inf

    def passes() -> int:
        return extra_forward_passes(strategy) if strategy is not None else 0

    for step in range(steps):
        try:
            value, grad = exact_value_and_grad(fn, x) if estimator is None else estimator.value_and_grad(fn, x)
        except NonFiniteError:
            return DescentResult(best, math.nan, step, True, passes())
        if not (math.isfinite(float(value)) and bool(torch.isfinite(grad).all())):
            return DescentResult(best, float(value), step, True, passes())
        best = min(best, float(value))
        if on_step is not None:
            on_step(step, best)
        if strategy is None:
            assert lr is not None  # sgd: checked before the first step
            x -= lr * grad
        else:
            x.grad = grad
            take_step(strategy, lambda tensors: fn(tensors[0]))
    with torch.no_grad():
        final = float(fn(x))
    return DescentResult(min(best, final), final, steps, not math.isfinite(final), passes())
