"""Closed-form test functions of the paper (Sec. 4.2; docs/reproducing.md, "Closed-form optimization"), each with
its start point and minimum.

All take x of shape (n,) and return a scalar:

- sphere:          f(x) = sum_i x_i^2, start (-1, ..., -1), minimum 0.
- rosenbrock:      f(x) = sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2, start (-1, 0, ..., 0),
                   minimum 0 (for n = 1 the sum is empty and f = 0).
- styblinski-tang: f(x) = 0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i), start 0, minimum -39.16616570 n (often quoted as -39.16599 n).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def sphere(x: torch.Tensor) -> torch.Tensor:
    """sum_i x_i^2 for x (n,)."""
    return (x * x).sum()


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2 for x (n,)."""
    head, tail = x[:-1], x[1:]
    valley, offset = tail - head * head, 1.0 - head
    squared = valley * valley
    # 100 * squared as squared + 99 squared (add with alpha: the same rounded number): torch.func's
    # vmap(jvp) takes a slow Python path for a product with a constant, about 0.3 ms a call
    return (torch.add(squared, squared, alpha=99.0) + offset * offset).sum()


def styblinski_tang(x: torch.Tensor) -> torch.Tensor:
    """0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i) for x (n,)."""
    x2 = x * x
    # constants through add with alpha, as in rosenbrock: the same rounded numbers as 16 x2, 5 x, 0.5 terms
    terms = torch.add(x2 * x2, x2, alpha=-16.0) + torch.add(x, x, alpha=4.0)
    return torch.add(terms, terms, alpha=-0.5).sum()


def _rosenbrock_start(n: int, dtype: torch.dtype) -> torch.Tensor:
    start = torch.zeros(n, dtype=dtype)
    start[0] = -1.0
    return start


@dataclass(frozen=True)
class TestFunction:
    """A closed-form function with the paper's start point, known minimum and step budget."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    start_fn: Callable[[int, torch.dtype], torch.Tensor]
    minimum_per_dim: float
    steps: int

    def start(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The start point, shape (n,)."""
        if n < 1:
            raise ValueError(f"the dimension n must be >= 1, got {n}")
        return self.start_fn(n, dtype)

    def minimum(self, n: int) -> float:
        """The global minimum value in dimension n."""
        return self.minimum_per_dim * n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


FUNCTIONS: dict[str, TestFunction] = {
    "sphere": TestFunction("sphere", sphere, lambda n, dt: -torch.ones(n, dtype=dt), 0.0, 1000),
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, _rosenbrock_start, 0.0, 25000),
    "styblinski-tang": TestFunction(
        "styblinski-tang", styblinski_tang, lambda n, dt: torch.zeros(n, dtype=dt), -39.16616570377141, 1000
    ),
}


def get_function(name: str) -> TestFunction:
    """The test function called ``name``; ValueError listing the valid names otherwise."""
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown function {name!r}; choose one of {', '.join(FUNCTIONS)}") from None
