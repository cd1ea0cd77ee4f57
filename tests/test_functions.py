"""Closed-form test functions (the paper's Sec. 4.2): start points, minima, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import autograd_grad
from hypothesis import given
from hypothesis import strategies as st

import frog

F64 = torch.float64
NAMES = ["sphere", "rosenbrock", "styblinski-tang"]
vectors = st.integers(1, 8).flatmap(
    lambda n: st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n)
).map(lambda xs: torch.tensor(xs, dtype=F64))


def sphere_grad(x):
    return 2 * x


def rosenbrock_grad(x):
    g = torch.zeros_like(x)
    head, tail = x[:-1], x[1:]
    g[:-1] += -400 * head * (tail - head**2) - 2 * (1 - head)
    g[1:] += 200 * (tail - head**2)
    return g


def styblinski_tang_grad(x):
    return 0.5 * (4 * x**3 - 32 * x + 5)


ANALYTIC = {"sphere": sphere_grad, "rosenbrock": rosenbrock_grad, "styblinski-tang": styblinski_tang_grad}


def test_registry_and_module_functions_agree():
    assert set(frog.FUNCTIONS) == set(NAMES)
    x = torch.linspace(-2, 2, 7, dtype=F64)
    for name, fn in [("sphere", frog.sphere), ("rosenbrock", frog.rosenbrock), ("styblinski-tang", frog.styblinski_tang)]:
        f = frog.get_function(name)
        assert f.name == name
        assert torch.equal(f(x), fn(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_functions_equal_the_textbook_formulas_to_the_last_bit(dtype):
    """The constants are applied through add-with-alpha (fast under vmap(jvp)): same numbers."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 64, 1000):
        x = 3 * torch.randn(n, generator=g, dtype=dtype)
        head, tail, x2 = x[:-1], x[1:], x * x
        assert torch.equal(frog.rosenbrock(x), (100.0 * (tail - head * head) ** 2 + (1.0 - head) ** 2).sum())
        assert torch.equal(frog.styblinski_tang(x), 0.5 * (x2 * x2 - 16.0 * x2 + 5.0 * x).sum())


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_start_points_and_values(n):
    sphere, rosen, st_ = (frog.get_function(name) for name in NAMES)
    assert torch.equal(sphere.start(n, F64), -torch.ones(n, dtype=F64))
    assert float(sphere(sphere.start(n, F64))) == n
    expected = torch.zeros(n, dtype=F64)
    expected[0] = -1
    assert torch.equal(rosen.start(n, F64), expected)
    # term i = 0: 100 (0 - 1)^2 + (1 + 1)^2 = 104; terms 0 < i < n - 1: (1 - 0)^2 = 1
    assert float(rosen(rosen.start(n, F64))) == (0 if n == 1 else 104 + (n - 2))
    assert torch.equal(st_.start(n, F64), torch.zeros(n, dtype=F64))
    assert float(st_(st_.start(n, F64))) == 0.0
    for name in NAMES:
        start = frog.get_function(name).start(n)
        assert start.shape == (n,) and start.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 3, 16, 100])
def test_known_minima(n):
    st_ = frog.get_function("styblinski-tang")
    x_star = torch.full((n,), -2.903534, dtype=F64)
    value = float(st_(x_star))
    assert abs(value - (-39.16599 * n)) < 1e-3 * n  # the value the paper quotes
    assert st_.minimum(n) == pytest.approx(value, rel=1e-9)  # frog's is the exact minimum
    assert float(autograd_grad(st_, x_star).abs().max()) < 1e-4  # stationary
    # a global minimum: no point of a fine 1-d grid (the function is separable) is lower
    grid = torch.linspace(-5, 5, 100001, dtype=F64)
    per_dim = 0.5 * (grid**4 - 16 * grid**2 + 5 * grid)
    assert float(per_dim.min()) * n >= value - 1e-6 * n

    sphere = frog.get_function("sphere")
    assert float(sphere(torch.zeros(n, dtype=F64))) == 0.0 == sphere.minimum(n)
    rosen = frog.get_function("rosenbrock")
    assert float(rosen(torch.ones(n, dtype=F64))) == 0.0 == rosen.minimum(n)
    assert torch.equal(autograd_grad(rosen, torch.ones(n, dtype=F64)), torch.zeros(n, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
@given(x=vectors)
def test_autograd_matches_analytic_gradient(name, x):
    f = frog.get_function(name)
    torch.testing.assert_close(autograd_grad(f, x), ANALYTIC[name](x), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@given(x=vectors)
def test_functions_are_nonnegative_above_minimum(name, x):
    f = frog.get_function(name)
    assert float(f(x)) >= f.minimum(x.numel()) - 1e-9 * x.numel()


def test_get_function_unknown_lists_names():
    with pytest.raises(ValueError, match="unknown function 'nope'; choose one of sphere, rosenbrock, styblinski-tang"):
        frog.get_function("nope")


def test_start_rejects_bad_dimension():
    with pytest.raises(ValueError, match="dimension n must be >= 1"):
        frog.get_function("sphere").start(0)
