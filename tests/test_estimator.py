"""ForwardGradient: value_and_grad, fill_grad, determinism, state, optimization, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import autograd_grad, gen, lstsq_projection
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import frog
from frog.engines import FiniteDifferenceEngine, JvpEngine, make_engine

F64 = torch.float64


def quartic(x):
    """A non-quadratic test function of a tensor of any shape."""
    return (x.square().sum() - 1.0).square() + (x.reshape(-1)[:-1] * x.reshape(-1)[1:]).sum() + x.sin().sum()


def make_model(frozen=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    if frozen:
        model[0].bias.requires_grad_(False)
    return model


def batch():
    g = gen(3)
    return torch.randn(10, 4, generator=g, dtype=F64), torch.randint(0, 2, (10,), generator=g)


# -- value_and_grad ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 1, 3)])
@pytest.mark.parametrize("engine", frog.ENGINES)
def test_value_and_grad_shape_and_value(shape, engine):
    x = torch.randn(*shape, generator=gen(0), dtype=F64)
    x_before = x.clone()
    value, est = frog.ForwardGradient(3, engine=engine, seed=1, scale_correction=False).value_and_grad(quartic, x)
    torch.testing.assert_close(value, quartic(x), rtol=1e-14, atol=0)
    assert est.shape == x.shape and est.dtype == x.dtype
    assert torch.equal(x, x_before)
    # the estimate is the projection of the true gradient onto 3 directions: nonzero, a descent
    # direction, and no longer than the gradient
    g = autograd_grad(quartic, x)
    assert float((est * g).sum()) > 0
    assert float(est.norm()) <= float(g.norm()) * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(12,), (3, 4)])
@pytest.mark.parametrize("kind", ["basis", "normal", "orthonormal"])
def test_grad_with_k_equals_n_is_exact(shape, kind):
    x = torch.randn(*shape, generator=gen(1), dtype=F64)
    est = frog.ForwardGradient(12, "project", kind, seed=2).grad(quartic, x)
    torch.testing.assert_close(est, autograd_grad(quartic, x), rtol=1e-9, atol=1e-11)


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6))
def test_grad_project_is_projection_of_true_gradient(seed, k):
    """grad() with project equals V^T lstsq(V^T, g) for the estimator's own tangents, and the
    estimator's tangents are the plan's (so we can reconstruct them)."""
    x = torch.randn(3, 3, generator=gen(seed), dtype=F64)
    fg = frog.ForwardGradient(k, "project", "normal", engine="loop", seed=seed, scale_correction=False)
    v = fg.plan([x.shape], x).block(0)
    est = fg.grad(quartic, x)
    torch.testing.assert_close(est, lstsq_projection(v, autograd_grad(quartic, x)), rtol=1e-8, atol=1e-10)


def test_grad_float32():
    x = torch.randn(6, generator=gen(0))
    value, est = frog.ForwardGradient(6, engine="jvp").value_and_grad(frog.sphere, x)
    assert value.dtype == est.dtype == torch.float32
    torch.testing.assert_close(est, 2 * x, rtol=1e-3, atol=1e-4)


# -- fill_grad ------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", frog.ENGINES)
def test_fill_grad_sets_every_trainable_grad_and_returns_loss(engine):
    model = make_model(frozen=True)
    xb, yb = batch()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    loss = frog.ForwardGradient(4, engine=engine, seed=0).fill_grad(model, loss_fn)
    torch.testing.assert_close(loss, loss_fn(model).detach(), rtol=1e-14, atol=0)
    assert not loss.requires_grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
            assert bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name
    # the filled gradient is the projection of the exact (trainable) gradient onto span(V)
    ref = copy.deepcopy(model)
    loss_fn(ref).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in ref.parameters() if p.requires_grad])
    est = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    assert float(est @ exact) > 0 and float(est.norm()) <= float(exact.norm()) * (1 + 1e-9)


def test_fill_grad_loss_may_read_parameters_directly():
    """Weight decay written as sum(p^2 for p in m.parameters()) inside loss_fn sees the
    perturbed parameters too: with k = n basis tangents the estimate is the exact gradient."""
    model = make_model()
    xb, yb = batch()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb) + 0.1 * sum(p.square().sum() for p in m.parameters())

    n = sum(p.numel() for p in model.parameters())
    for engine in ("jvp", "loop", "sim"):
        m = copy.deepcopy(model)
        frog.ForwardGradient(n, "project", "basis", engine=engine).fill_grad(m, loss_fn)
        ref = copy.deepcopy(model)
        loss_fn(ref).backward()
        for p, q in zip(m.parameters(), ref.parameters(), strict=False):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_sgd_step_uses_filled_grad():
    model = make_model()
    xb, yb = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    frog.ForwardGradient(8, seed=0).fill_grad(model, lambda m: F.cross_entropy(m(xb), yb))
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), before, grads, strict=False):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-14, atol=1e-15)


def test_training_loop_decreases_loss():
    model = make_model()
    xb, yb = batch()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    start = float(loss_fn(model).detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    fg = frog.ForwardGradient(8, seed=0)
    for _ in range(60):
        opt.zero_grad()
        fg.fill_grad(model, loss_fn)
        opt.step()
    assert float(loss_fn(model).detach()) < 0.8 * start


@pytest.mark.parametrize("engine", ["jvp", "sim"])
def test_fill_grad_accumulate(engine):
    model = make_model()
    xb, yb = batch()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    separate = frog.ForwardGradient(3, engine=engine, seed=9)
    m = copy.deepcopy(model)
    separate.fill_grad(m, loss_fn)
    first = [p.grad.clone() for p in m.parameters()]
    separate.fill_grad(m, loss_fn)  # overwrites by default
    second = [p.grad.clone() for p in m.parameters()]
    assert not torch.equal(first[0], second[0])

    acc = frog.ForwardGradient(3, engine=engine, seed=9)
    m = copy.deepcopy(model)
    acc.fill_grad(m, loss_fn, accumulate=True)  # no grad yet: sets it
    for p, a in zip(m.parameters(), first, strict=False):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)
    acc.fill_grad(m, loss_fn, accumulate=True)
    for p, a, b in zip(m.parameters(), first, second, strict=False):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-14, atol=1e-16)


# -- determinism and state ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,angle", [("normal", None), ("rademacher", None), ("orthonormal", None), ("angle", 30.0)])
@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_same_seed_same_sequence_different_seed_differs(kind, angle, engine):
    x = torch.randn(7, generator=gen(0), dtype=F64)

    def run(seed):
        fg = frog.ForwardGradient(3, "mean", kind, engine=engine, seed=seed, angle=angle)
        return [fg.grad(quartic, x) for _ in range(3)]

    torch.manual_seed(0)
    a = run(5)
    torch.manual_seed(1)  # the global RNG does not matter, only the seed
    b = run(5)
    c = run(6)
    for u, v in zip(a, b, strict=False):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], a[1])  # every call draws new tangents
    assert all(not torch.allclose(u, w) for u, w in zip(a, c, strict=False))


def test_state_dict_resumes_tangent_sequence():
    x = torch.randn(3, 4, generator=gen(0), dtype=F64)
    fg = frog.ForwardGradient(2, seed=11)
    for _ in range(3):
        fg.grad(quartic, x)
    state = fg.state_dict()
    expected = [fg.grad(quartic, x) for _ in range(2)]
    resumed = frog.ForwardGradient(2, seed=0)
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.state_dict() == state
    got = [resumed.grad(quartic, x) for _ in range(2)]
    for u, v in zip(expected, got, strict=False):
        assert torch.equal(u, v)
    # a fresh estimator with the same seed but no state starts over, so it differs
    assert not torch.equal(frog.ForwardGradient(2, seed=11).grad(quartic, x), expected[0])


# -- optimization ---------------------------------------------------------------------------------
def descend(fg, fn, x, lr, steps):
    values = [float(fn(x))]
    for _ in range(steps):
        x = x - lr * fg.grad(fn, x)
        values.append(float(fn(x)))
    return x, values


def test_optimization_styblinski_tang():
    n = 16
    f = frog.get_function("styblinski-tang")
    start = f.start(n, F64)
    x_frog, v_frog = descend(frog.ForwardGradient(16, "project", seed=0), f, start, 0.01, 300)
    _x_mean, v_mean = descend(frog.ForwardGradient(16, "mean", seed=0), f, start, 0.01, 300)
    _x_few, v_few = descend(frog.ForwardGradient(4, "project", seed=0), f, start, 0.01, 300)
    assert v_frog[-1] < v_frog[0] and v_mean[-1] < v_mean[0] and v_few[-1] < v_few[0]
    # k = n frog is gradient descent: it reaches a stationary point, a local minimum of the
    # separable function, i.e. every coordinate at one of the two 1-d minima
    g = autograd_grad(f, x_frog)
    assert float(g.norm()) < 1e-6
    for xi in x_frog.tolist():
        assert min(abs(xi + 2.903534), abs(xi - 2.7468)) < 1e-3
    # fewer tangents make less progress than full gradient descent in the same number of steps
    assert v_few[50] > v_frog[50]


@pytest.mark.parametrize("kind", ["basis", "normal", "orthonormal"])
@pytest.mark.parametrize("name", ["styblinski-tang", "rosenbrock"])
def test_frog_k_equals_n_is_gradient_descent_step_by_step(kind, name):
    f = frog.get_function(name)
    lr = 0.01 if name == "styblinski-tang" else 1e-3
    x = f.start(8, F64) + 0.1
    y = x.clone()
    fg = frog.ForwardGradient(8, "project", kind, seed=0)
    for _ in range(40):
        x = x - lr * fg.grad(f, x)
        y = y - lr * autograd_grad(f, y)
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)
    assert float(f(y)) < float(f(f.start(8, F64) + 0.1))


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 2.0, True, "3", None])
def test_num_tangents_must_be_positive_int(k):
    with pytest.raises(ValueError, match="num_tangents must be an integer >= 1"):
        frog.ForwardGradient(num_tangents=k)
    with pytest.raises(ValueError, match="integer >= 1"):
        frog.sample_tangents(k, 5)


def test_basis_with_more_tangents_than_dimension():
    fg = frog.ForwardGradient(5, sampler="basis")
    with pytest.raises(ValueError, match=r"at most n = 4 tangents, but 5"):
        fg.grad(frog.sphere, torch.ones(4))
    for kind in ("basis", "orthonormal"):
        with pytest.raises(ValueError, match="at most n = 3"):
            frog.sample_tangents(4, 3, kind=kind)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({"aggregation": "median"}, frog.METHODS),
        ({"sampler": "uniform"}, frog.KINDS),
        ({"engine": "reverse"}, frog.ENGINES),
    ],
)
def test_unknown_names_list_valid_ones(kwargs, names):
    with pytest.raises(ValueError) as info:
        frog.ForwardGradient(2, **kwargs)
    message = str(info.value)
    assert repr(next(iter(kwargs.values()))) in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("angle", [0, 0.0, -10.0, 90.0001, 180.0, float("nan")])
def test_angle_outside_range(angle):
    with pytest.raises(ValueError, match=r"angle must lie in \(0, 90\]"):
        frog.ForwardGradient(2, sampler="angle", angle=angle)
    with pytest.raises(ValueError, match=r"angle must lie in \(0, 90\]"):
        frog.sample_tangents(2, 5, kind="angle", angle=angle)


def test_angle_required_and_only_for_angle():
    with pytest.raises(ValueError, match="needs angle="):
        frog.ForwardGradient(2, sampler="angle")
    with pytest.raises(ValueError, match="only used with sampler='angle'"):
        frog.ForwardGradient(2, sampler="normal", angle=30.0)


@pytest.mark.parametrize("engine", frog.ENGINES)
@pytest.mark.parametrize(
    "fn,x",
    [
        (lambda x: torch.log(x).sum(), -torch.ones(4, dtype=F64)),
        (frog.sphere, torch.tensor([1.0, float("inf"), 0.0], dtype=F64)),
        (lambda x: torch.sqrt(x).sum(), torch.zeros(3, dtype=F64)),  # finite loss, infinite jvps
    ],
)
def test_non_finite_raises_with_advice(engine, fn, x):
    fg = frog.ForwardGradient(2, engine=engine)
    fg.grad(frog.sphere, torch.ones(3, dtype=F64))
    fg.grad(frog.sphere, torch.ones(3, dtype=F64))
    with pytest.raises(frog.NonFiniteError, match=r"step 2\b.*learning rate"):
        fg.grad(fn, x)


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_non_finite_in_fill_grad_restores_batchnorm(engine):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train()
    xb = torch.randn(5, 3, dtype=F64)
    with pytest.raises(frog.NonFiniteError, match="step.*learning rate"):
        frog.ForwardGradient(2, engine=engine).fill_grad(model, lambda m: m(xb).sum() * float("nan"))
    assert model[1].track_running_stats and int(model[1].num_batches_tracked) <= 1


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_non_scalar_function(engine):
    with pytest.raises(ValueError, match="must return a scalar"):
        frog.ForwardGradient(2, engine=engine).grad(lambda x: x * 2, torch.ones(3, dtype=F64))


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_function_independent_of_x_gives_zero(engine):
    value, est = frog.ForwardGradient(2, engine=engine).value_and_grad(
        lambda x: torch.tensor(3.0, dtype=F64), torch.ones(3, dtype=F64)
    )
    assert float(value) == 3.0
    assert torch.equal(est, torch.zeros(3, dtype=F64))


def test_bad_inputs():
    fg = frog.ForwardGradient(2)
    with pytest.raises(ValueError, match="floating-point"):
        fg.grad(frog.sphere, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one element"):
        fg.grad(frog.sphere, torch.ones(0))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        fg.fill_grad(lambda x: x, lambda m: m)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        fg.fill_grad(frozen, lambda m: m(torch.ones(2)).sum())
    with pytest.raises(ValueError, match="the fd engine's step must be a finite number > 0"):
        frog.ForwardGradient(2, engine=FiniteDifferenceEngine(0.0))
    with pytest.warns(DeprecationWarning, match="engine=FiniteDifferenceEngine"), \
            pytest.raises(ValueError, match="the fd engine's step must be"):
        frog.ForwardGradient(2, engine="fd", fd_step=0.0)  # the older way to give the step
    with pytest.raises(ValueError, match="fd_step is the step of engine='fd'"):
        make_engine("sim", fd_step=1e-3)
    with pytest.raises(ValueError, match="carries its own options"):
        make_engine(JvpEngine(max_streams=2), max_streams=3)
    with pytest.raises(ValueError, match="seed must be an integer"):
        frog.ForwardGradient(2, seed=1.5)


def test_diverging_run_raises_non_finite_error():
    """A real run: sum with k = 16 (|estimate| ~ k |g|) at lr 0.01 diverges on Styblinski-Tang and
    the estimator stops with the advice instead of returning NaN estimates."""
    f = frog.get_function("styblinski-tang")
    fg = frog.ForwardGradient(16, "sum", seed=0, scale_correction=False)
    x = f.start(16, F64)
    with pytest.raises(frog.NonFiniteError, match=r"step \d+.*smaller learning rate"):
        for _ in range(100):
            x = x - 0.01 * fg.grad(f, x)
    assert 0 < fg.step < 100
