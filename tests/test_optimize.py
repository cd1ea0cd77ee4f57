"""Gradient descent on a function of one tensor (frog.training.optimize) against the closed form of descent
on a quadratic, with exact and forward gradients; divergence stops the run."""

from __future__ import annotations

import math

import pytest
import torch

import frog
from frog.training.optimize import DescentResult, exact_value_and_grad, gradient_descent

F64 = torch.float64
WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)


def quadratic(x: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i^2: gradient 2 w x, and a step x <- (1 - 2 lr w) x."""
    return (WEIGHTS * x * x).sum()


def closed_form(x0: torch.Tensor, lr: float, t: int) -> torch.Tensor:
    return (1 - 2 * lr * WEIGHTS) ** t * x0


def test_exact_value_and_grad():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)
    value, grad = exact_value_and_grad(quadratic, x)
    assert value.item() == pytest.approx(1 + 8 + 4.5 + 0.75) and not value.requires_grad
    torch.testing.assert_close(grad, 2 * WEIGHTS * x)
    assert not x.requires_grad


def test_descent_with_exact_gradients_is_the_closed_form():
    x0 = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64)
    seen = []
    result = gradient_descent(quadratic, x0, 0.1, 6, on_step=lambda t, best: seen.append((t, best)))
    values = [quadratic(closed_form(x0, 0.1, t)).item() for t in range(7)]  # |1 - 2 lr w| < 1: decreasing
    assert result.final_value == pytest.approx(values[6], rel=1e-12)
    assert result.best_value == pytest.approx(values[6], rel=1e-12)
    assert (result.steps, result.diverged, result.extra_forward_passes) == (6, False, 0)
    assert [t for t, _ in seen] == list(range(6))
    assert [best for _, best in seen] == pytest.approx(values[:6], rel=1e-12)  # f(x_t), the best so far
    assert torch.equal(x0, torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64))  # the start is not moved


def test_frog_with_k_equal_n_descends_as_the_exact_gradient():
    x0 = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64)
    exact = gradient_descent(quadratic, x0, 0.1, 5)
    frog_k4 = gradient_descent(quadratic, x0, 0.1, 5, frog.ForwardGradient(4, seed=3))
    assert frog_k4.final_value == pytest.approx(exact.final_value, rel=1e-10)
    fg_k1 = gradient_descent(quadratic, x0, 0.1, 5, frog.ForwardGradient(1, "mean", seed=3, scale_correction=False))
    assert fg_k1.final_value != pytest.approx(exact.final_value, rel=1e-6)  # one tangent: another path


def test_divergence_stops_the_run_and_keeps_the_best_finite_value():
    """lr = 1.5 on sphere: x_t = (-2)^t x_0 until f is infinite (past float32's range)."""
    x0 = torch.ones(2)
    result = gradient_descent(frog.sphere, x0, 1.5, 200)
    t = next(t for t in range(200) if not math.isfinite(float(frog.sphere((-2.0) ** t * x0))))
    assert result.diverged and result.steps == t and result.final_value == math.inf
    assert result.best_value == 2.0  # f(x_0)


def test_a_non_finite_estimate_ends_the_run_as_diverged():
    result = gradient_descent(lambda x: (x * x).sum() / (x.sum() - 2.0).abs(), torch.ones(2, dtype=F64), 0.1, 5,
                              frog.ForwardGradient(1))
    assert result == DescentResult(math.inf, result.final_value, 0, True, 0) and math.isnan(result.final_value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="the learning rate must be > 0, got 0"):
        gradient_descent(frog.sphere, torch.ones(2), 0.0, 5)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        gradient_descent(frog.sphere, torch.ones(2), 0.1, -1)
    with pytest.raises(ValueError, match="--lr"):  # plain SGD needs a step size
        gradient_descent(frog.sphere, torch.ones(2), None, 5)
    result = gradient_descent(frog.sphere, torch.ones(2), 0.1, 0)
    assert result == DescentResult(2.0, 2.0, 0, False, 0)
