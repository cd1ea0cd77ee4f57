"""Engines: jvp, loop, sim and fd give the same jvps and estimates (fd within truncation error)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import KINDS_AND_ANGLES, autograd_grad, gen
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import frog
from frog.engines import make_engine

F64 = torch.float64
EPS = torch.finfo(F64).eps
FD_STEP = 1e-3  # the default fd_step


# -- closed-form functions with bounds on the third directional derivative ------------------------
def make_quadratic(n, seed):
    a = torch.randn(n, n, generator=gen(seed), dtype=F64)
    a = a @ a.T + torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=gen(seed + 1), dtype=F64)
    return lambda x: 0.5 * x @ (a @ x) + b @ x


def third_derivative_bound(name, x, h):
    """max |d^3/dt^3 f(x + t u)| over |u| = 1 and |t| <= h (derived per function in the comments)."""
    r = float(x.abs().max()) + h
    if name in ("sphere", "quadratic"):
        return 0.0  # polynomials of degree 2
    if name == "styblinski_tang":
        return 12.0 * r  # f''' = sum_i 12 x_i u_i^3 and sum |u_i|^3 <= 1
    if name == "rosenbrock":
        # 100 (y - x^2)^2 along (a, b) has third derivative -1200 a^2 (b - 2 a x); summing over
        # i with a = u_i, b = u_{i+1}: <= 1200 (sum u_i^2 |u_{i+1}| + 2 r sum |u_i|^3) <= 1200 (1 + 2r)
        return 1200.0 * (1.0 + 2.0 * r)
    raise AssertionError(name)


def fd_jvp_error_bound(name, fn, x, w_norm, h=FD_STEP):
    """|fd jvp - exact jvp| for a raw tangent of norm w_norm: truncation h^2/6 max|f'''| plus
    rounding of two function values (and of x +- h u) divided by 2h."""
    g = autograd_grad(fn, x)
    scale = abs(float(fn(x))) + float(g.norm() * x.norm()) + 1.0
    rounding = 64 * EPS * scale / h
    return w_norm * (h * h / 6.0 * third_derivative_bound(name, x, h) + rounding)


FUNCTIONS = {
    "sphere": frog.sphere,
    "rosenbrock": frog.rosenbrock,
    "styblinski_tang": frog.styblinski_tang,
    "quadratic": make_quadratic(6, 99),
}


def estimator(kind, angle, aggregation, engine, k=4, seed=3, **kw):
    """The plain estimator (no length correction): these tests check the aggregations' math."""
    return frog.ForwardGradient(num_tangents=k, aggregation=aggregation, sampler=kind, engine=engine, seed=seed,
                                angle=angle, **{"scale_correction": False, **kw})


def linear_map(fg, x):
    """The (n, k) matrix L with estimate = L @ raw_jvps for fg's next call (the estimate is linear
    in the jvps); its spectral norm turns a jvp error bound into an estimate error bound."""
    plan = fg.plan([x.shape], x)
    k = fg.num_tangents
    coeffs = fg.coefficients(plan, torch.eye(k, dtype=F64))  # column j: coefficients of e_j
    w = plan.block(0).reshape(k, -1)
    return w.T @ coeffs, w


# -- jvps of each engine against autograd ---------------------------------------------------------
@pytest.mark.parametrize("engine", frog.ENGINES)
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_engine_jvps_match_autograd(engine, name):
    fn = FUNCTIONS[name]
    x = torch.rand(6, generator=gen(1), dtype=F64) * 4 - 2
    plan = frog.TangentPlan("normal", 5, [x.shape], seed=7, step=0, dtype=F64)
    value, jvps = make_engine(engine)(lambda p: fn(p["x"]), {"x": x}, plan)
    w = plan.block(0)
    exact = w @ autograd_grad(fn, x)
    assert jvps.shape == (5,)
    torch.testing.assert_close(value, fn(x), rtol=1e-14, atol=0)
    if engine == "fd":
        bound = torch.tensor([fd_jvp_error_bound(name, fn, x, float(r.norm())) for r in w], dtype=F64)
        assert bool(((jvps - exact).abs() <= bound).all()), ((jvps - exact).abs(), bound)
    else:
        torch.testing.assert_close(jvps, exact, rtol=1e-12, atol=1e-12 * float(exact.abs().max()))


def test_fd_error_is_second_order_in_step():
    """Central differences: halving h divides the error by ~4 (checks the bound is not vacuous)."""
    fn, x = frog.styblinski_tang, torch.full((4,), 1.5, dtype=F64)
    plan = frog.TangentPlan("normal", 3, [x.shape], seed=0, step=0, dtype=F64)
    exact = plan.block(0) @ autograd_grad(fn, x)
    errs = []
    for h in (1e-1, 5e-2):
        _, jvps = make_engine("fd", h)(lambda p: fn(p["x"]), {"x": x}, plan)
        errs.append(float((jvps - exact).abs().max()))
    assert 3.5 < errs[0] / errs[1] < 4.5


# -- estimates of all engines agree ---------------------------------------------------------------
@pytest.mark.parametrize("kind,angle", KINDS_AND_ANGLES)
@pytest.mark.parametrize("aggregation", frog.METHODS)
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_engines_agree_on_closed_form_functions(kind, angle, aggregation, name):
    fn = FUNCTIONS[name]
    x = torch.rand(6, generator=gen(2), dtype=F64) * 4 - 2
    estimates = {e: estimator(kind, angle, aggregation, e).grad(fn, x) for e in frog.ENGINES}
    ref = estimates["sim"]
    assert ref.shape == x.shape and ref.dtype == F64
    scale = float(ref.norm())
    for e in ("jvp", "loop"):
        torch.testing.assert_close(estimates[e], ref, rtol=1e-10, atol=1e-10 * scale)
    # fd: |L (d_fd - d)| <= |L|_2 |delta|_2 with the per-jvp bound delta_i
    lin, w = linear_map(estimator(kind, angle, aggregation, "sim"), x)
    delta = torch.tensor([fd_jvp_error_bound(name, fn, x, float(r.norm())) for r in w], dtype=F64)
    bound = float(torch.linalg.matrix_norm(lin, 2)) * float(delta.norm())
    assert float((estimates["fd"] - ref).norm()) <= bound + 1e-300
    # the estimate is the aggregation of the exact jvps, independently: sim vs aggregate(V, V g)
    g = autograd_grad(fn, x)
    torch.testing.assert_close(lin @ (w @ g), ref, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("aggregation", frog.METHODS)
@pytest.mark.parametrize("kind,angle", KINDS_AND_ANGLES)
def test_sim_estimate_matches_explicit_tangents(kind, angle, aggregation):
    """The estimator equals frog.aggregate on the explicit tangents V = T W with jvps V g."""
    fn = FUNCTIONS["quadratic"]
    x = torch.rand(6, generator=gen(4), dtype=F64)
    fg = estimator(kind, angle, aggregation, "sim", k=3)
    plan = fg.plan([x.shape], x)
    w = plan.block(0).reshape(3, -1)
    t = plan.transform()
    v = w if t is None else t @ w
    g = autograd_grad(fn, x)
    expected = frog.aggregate(v, v @ g, aggregation)
    torch.testing.assert_close(fg.grad(fn, x), expected, rtol=1e-10, atol=1e-12)
    if aggregation == "project":  # and Lemma 2 independently of the library
        c = torch.linalg.lstsq(v.T, g[:, None]).solution
        torch.testing.assert_close(expected, (v.T @ c)[:, 0], rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5), n=st.integers(2, 6))
def test_engines_agree_random_quadratic_hypothesis(seed, k, n):
    fn = make_quadratic(n, seed)
    x = torch.randn(n, generator=gen(seed + 2), dtype=F64)
    est = {e: frog.ForwardGradient(k, "project", engine=e, seed=seed).grad(fn, x) for e in frog.ENGINES}
    scale = float(autograd_grad(fn, x).norm()) + 1.0
    for e in ("jvp", "loop", "fd"):
        # fd on a quadratic is exact up to rounding (no truncation error); project amplifies by 1/sigma_min
        tol = 1e-10 * scale if e != "fd" else 1e-6 * scale
        torch.testing.assert_close(est[e], est["sim"], rtol=0, atol=tol)


def test_multi_block_sim_jvps_sum_over_blocks():
    """With several primals, jvps are <grad, w> summed over all blocks."""
    a, b = torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64)

    def fn(p):
        return (p["a"].sin().sum() * p["b"]).square().sum()

    plan = frog.TangentPlan("normal", 4, [a.shape, b.shape], seed=1, step=0, dtype=F64)
    ga, gb = torch.func.grad(fn)({"a": a, "b": b}).values()
    exact = plan.block(0).reshape(4, -1) @ ga.reshape(-1) + plan.block(1) @ gb
    for engine in ("jvp", "loop", "sim"):
        _, jvps = make_engine(engine)(fn, {"a": a, "b": b}, plan)
        torch.testing.assert_close(jvps, exact, rtol=1e-12, atol=1e-12)


# -- modules ----------------------------------------------------------------------------------------
def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def mlp_data():
    g = gen(10)
    return torch.randn(16, 5, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)


def cnn_data():
    g = gen(11)
    return torch.randn(4, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def fill(model, engine, loss_fn, kind="normal", angle=None, aggregation="project", k=3, **kw):
    m = copy.deepcopy(model)
    fg = frog.ForwardGradient(k, aggregation, kind, engine=engine, seed=5, angle=angle,
                              **{"scale_correction": False, **kw})
    loss = fg.fill_grad(m, loss_fn)
    return m, loss


MLP_FD_STEP = 1e-5


def test_mlp_relu_is_linear_within_fd_stencil():
    """Precondition of the fd comparison below: no ReLU input is within reach of a parameter
    perturbation of length h (|dW x + db| <= h sqrt(|x|^2 + 1)), so the loss is smooth there."""
    model = make_mlp()
    xb, _ = mlp_data()
    with torch.no_grad():
        pre = model[0](xb)
    reach = MLP_FD_STEP * float(torch.sqrt(xb.square().sum(1) + 1).max())
    assert float(pre.abs().min()) > 10 * reach


@pytest.mark.parametrize("kind,angle", KINDS_AND_ANGLES)
@pytest.mark.parametrize("aggregation", frog.METHODS)
def test_engines_agree_on_mlp(kind, angle, aggregation):
    model = make_mlp()
    xb, yb = mlp_data()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    ref_model, ref_loss = fill(model, "sim", loss_fn, kind, angle, aggregation, fd_step=MLP_FD_STEP)
    ref = flat_grads(ref_model)
    torch.testing.assert_close(ref_loss, loss_fn(model).detach(), rtol=1e-14, atol=0)
    for engine in ("jvp", "loop", "fd"):
        m, loss = fill(model, engine, loss_fn, kind, angle, aggregation, fd_step=MLP_FD_STEP)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
        # fd: truncation O(h^2) ~ 1e-10 and rounding eps/h ~ 1e-11, relative to a loss of O(1)
        tol = 1e-10 if engine != "fd" else 1e-6
        torch.testing.assert_close(flat_grads(m), ref, rtol=0, atol=tol * float(ref.norm()))


@pytest.mark.parametrize("aggregation", frog.METHODS)
def test_engines_agree_on_cnn_with_batchnorm(aggregation):
    model = make_cnn()
    model.train()
    xc, yc = cnn_data()

    def loss_fn(m):
        return F.cross_entropy(m(xc), yc)

    ref_model, ref_loss = fill(model, "sim", loss_fn, aggregation=aggregation, fd_step=1e-4)
    ref = flat_grads(ref_model)
    for engine in ("jvp", "loop", "fd"):
        m, loss = fill(model, engine, loss_fn, aggregation=aggregation, fd_step=1e-4)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
        tol = 1e-10 if engine != "fd" else 1e-6
        torch.testing.assert_close(flat_grads(m), ref, rtol=0, atol=tol * float(ref.norm()))


@pytest.mark.parametrize("make_model,data", [(make_mlp, mlp_data), (make_cnn, cnn_data)])
@pytest.mark.parametrize("aggregation", ["project", "sum"])
def test_sim_basis_k_equals_n_is_exact_gradient(make_model, data, aggregation):
    model = make_model()
    xb, yb = data()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    n = sum(p.numel() for p in model.parameters())
    m, _ = fill(model, "sim", loss_fn, "basis", None, aggregation, k=n)
    exact = copy.deepcopy(model)
    loss_fn(exact).backward()
    for p, q in zip(m.parameters(), exact.parameters(), strict=False):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_batchnorm_running_stats_updated_exactly_once(engine):
    model = make_cnn()
    model.train()
    xc, yc = cnn_data()

    def loss_fn(m):
        return F.cross_entropy(m(xc), yc)

    m, _ = fill(model, engine, loss_fn, k=4, fd_step=1e-4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(xc)  # one plain forward pass in train mode
    bn, ref_bn = m[1], reference[1]
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-14, atol=1e-16)
    assert not torch.equal(bn.running_mean, model[1].running_mean)  # it did move
    assert bn.training and bn.track_running_stats  # restored


@pytest.mark.parametrize("perturbation", ["weight", "activity"])
@pytest.mark.parametrize("engine", frog.ENGINES)
def test_batchnorm_outside_the_model_updated_exactly_once(engine, perturbation):
    """A GAN's generator step: the loss runs a discriminator (not the model) with BatchNorm in train mode.
    Every engine gives sim's estimate, and the discriminator's statistics move once, as in one plain pass."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Sequential(nn.Linear(3, 6), nn.Tanh()), nn.Linear(6, 4)).double()
    discriminator = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double().train()
    z = torch.randn(8, 3, generator=gen(4), dtype=F64)
    reduction = "none" if perturbation == "activity" else "mean"

    def loss_fn(m, d):
        return F.binary_cross_entropy_with_logits(d(m(z)).squeeze(1), torch.ones(8, dtype=F64), reduction=reduction)

    def step(engine):
        d = copy.deepcopy(discriminator)
        m, _ = fill(generator, engine, lambda m: loss_fn(m, d), k=4, fd_step=1e-5, perturbation=perturbation)
        return flat_grads(m), d[1]

    reference, _ = step("sim")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, bn = step(engine)
    tol = 1e-6 if engine == "fd" else 1e-10
    if perturbation == "weight":
        torch.testing.assert_close(got, reference, rtol=0, atol=tol * float(reference.norm()))
    else:  # the discriminator's BatchNorm couples the samples: forward mode estimates something else, and says so
        assert any("outside the model" in str(w.message) for w in caught) == (engine != "sim")
    plain = copy.deepcopy(discriminator)
    with torch.no_grad():
        plain(generator(z))
    assert int(bn.num_batches_tracked) == int(plain[1].num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, plain[1].running_mean, rtol=1e-14, atol=1e-16)
    assert bn.track_running_stats  # restored


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_batchnorm_eval_mode_stats_untouched(engine):
    model = make_cnn()
    model.eval()
    xc, yc = cnn_data()
    m, _ = fill(model, engine, lambda m: F.cross_entropy(m(xc), yc), fd_step=1e-4)
    assert int(m[1].num_batches_tracked) == 0
    assert torch.equal(m[1].running_mean, model[1].running_mean)
    assert torch.equal(m[1].running_var, model[1].running_var)


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_dropout_same_mask_in_every_pass(engine):
    """Multi-pass engines replay the RNG, so a dropout model gives the sim engine's estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    xb, yb = mlp_data()

    def loss_fn(m):
        return F.cross_entropy(m(xb), yb)

    torch.manual_seed(123)
    ref_model, ref_loss = fill(model, "sim", loss_fn, fd_step=1e-5)
    torch.manual_seed(123)
    m, loss = fill(model, engine, loss_fn, fd_step=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
    tol = 1e-10 if engine != "fd" else 1e-6
    ref = flat_grads(ref_model)
    torch.testing.assert_close(flat_grads(m), ref, rtol=0, atol=tol * float(ref.norm()))
    # the dropout mask matters: a different RNG state gives a different loss
    torch.manual_seed(124)
    _, other = fill(model, "sim", loss_fn)
    assert not math.isclose(float(other), float(ref_loss), rel_tol=1e-9)


# -- forward-mode errors --------------------------------------------------------------------------
def pdist_fn(x):
    return F.pdist(x.reshape(4, 2)).sum()


@pytest.mark.parametrize("engine", ["jvp", "loop"])
def test_missing_forward_rule_raises_forward_mode_error(engine):
    x = torch.randn(8, generator=gen(0), dtype=F64)
    with pytest.raises(frog.ForwardModeError) as info:
        frog.ForwardGradient(3, engine=engine).grad(pdist_fn, x)
    message = str(info.value)
    assert "_pdist_forward" in message
    assert f"engine={engine!r}" in message
    assert "engine='sim'" in message and "engine='fd'" in message
    assert isinstance(info.value.__cause__, (RuntimeError, NotImplementedError))


@pytest.mark.parametrize("engine", ["jvp", "loop"])
def test_sparse_tensors_raise_forward_mode_error(engine):
    """A graph convolution with a sparse adjacency matrix (torch.spmm), as in pytorch/examples' GCN."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    adjacency = torch.eye(4, dtype=F64).to_sparse()
    x, y = torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0])
    with pytest.raises(frog.ForwardModeError, match="sparse tensor"):
        frog.ForwardGradient(2, engine=engine).fill_grad(layer, lambda m: F.cross_entropy(torch.spmm(adjacency, m(x)), y))
    frog.ForwardGradient(2, engine="sim").fill_grad(layer, lambda m: F.cross_entropy(torch.spmm(adjacency, m(x)), y))
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("engine", ["sim", "fd"])
def test_missing_forward_rule_works_with_sim_and_fd(engine):
    x = torch.randn(8, generator=gen(0), dtype=F64)
    fg = frog.ForwardGradient(8, "project", engine=engine, fd_step=1e-5)
    est = fg.grad(pdist_fn, x)
    # k = n: the exact gradient (fd: truncation h^2 and rounding eps/h, both << 1e-6)
    torch.testing.assert_close(est, autograd_grad(pdist_fn, x), rtol=1e-6, atol=1e-8)


class _SquareNewStyle(torch.autograd.Function):
    """x^2 with backward only (setup_context style), no jvp."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareVmap(_SquareNewStyle):
    generate_vmap_rule = True


class _SquareOldStyle(torch.autograd.Function):
    """x^2 with the classic forward(ctx, x) signature, backward only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("engine", ["jvp", "loop"])
@pytest.mark.parametrize(
    "function", [_SquareNewStyle, _SquareVmap, _SquareOldStyle]
)
def test_custom_function_without_jvp_raises_forward_mode_error(engine, function):
    x = torch.randn(5, generator=gen(0), dtype=F64)
    with pytest.raises(frog.ForwardModeError, match=r"custom torch.autograd.Function.*engine='sim'.*engine='fd'"):
        frog.ForwardGradient(2, engine=engine).grad(lambda x: function.apply(x).sum(), x)


@pytest.mark.parametrize("engine", ["sim", "fd"])
@pytest.mark.parametrize("function", [_SquareNewStyle, _SquareOldStyle])
def test_custom_function_without_jvp_works_with_sim_and_fd(engine, function):
    x = torch.randn(5, generator=gen(0), dtype=F64)
    est = frog.ForwardGradient(5, engine=engine, fd_step=1e-5).grad(lambda x: function.apply(x).sum(), x)
    torch.testing.assert_close(est, 2 * x, rtol=1e-6, atol=1e-8)


class _SquareWithJvp(_SquareNewStyle):
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


@pytest.mark.parametrize("engine", frog.ENGINES)
def test_custom_function_with_jvp_works_everywhere(engine):
    x = torch.randn(5, generator=gen(0), dtype=F64)
    est = frog.ForwardGradient(5, engine=engine, fd_step=1e-5).grad(lambda x: _SquareWithJvp.apply(x).sum(), x)
    torch.testing.assert_close(est, 2 * x, rtol=1e-6, atol=1e-8)


def test_unknown_engine_lists_engines():
    with pytest.raises(ValueError, match="unknown engine 'reverse'; choose one of jvp, loop, sim, fd"):
        make_engine("reverse")


def test_other_runtime_errors_pass_through():
    """Errors unrelated to forward mode are not disguised as ForwardModeError."""
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        frog.ForwardGradient(2, engine="jvp").grad(lambda x: (x.reshape(2, 3) @ x.reshape(2, 3)).sum(), torch.ones(6))
    assert not isinstance(info.value, frog.ForwardModeError)


# -- the jvp engine's tangent budget -----------------------------------------------------------
@pytest.mark.parametrize("kind,angle", [("normal", None), ("orthonormal", None), ("angle", 30.0)])
def test_jvp_in_chunks_within_a_tangent_budget_matches_sim(kind, angle):
    """A budget below k x n splits the jvp passes; the estimate is the same as from autograd."""
    model = make_cnn()
    model.train()
    xc, yc = cnn_data()

    def loss_fn(m):
        return F.cross_entropy(m(xc), yc)

    ref_model, _ = fill(model, "sim", loss_fn, kind, angle, k=5)
    ref = flat_grads(ref_model)
    n = sum(p.numel() for p in model.parameters())
    budget_mb = 2 * n * 8 / 2**20  # two float64 tangent rows per pass: passes of 2, 2, 1 rows
    m, _ = fill(model, "jvp", loss_fn, kind, angle, k=5, tangent_budget_mb=budget_mb)
    torch.testing.assert_close(flat_grads(m), ref, rtol=0, atol=1e-10 * float(ref.norm()))


@pytest.mark.parametrize("engine", frog.ENGINES)
@pytest.mark.parametrize("aggregation", frog.METHODS)
def test_tangents_regenerated_beyond_the_budget_give_the_same_estimate(engine, aggregation):
    """A budget below k x n: tangents are generated again for the Gram matrix and the estimate
    instead of being kept; the estimate is the same (the streams are counter-seeded)."""
    model = make_cnn()
    model.train()
    xc, yc = cnn_data()

    def loss_fn(m):
        return F.cross_entropy(m(xc), yc)

    shapes, like = [p.shape for p in model.parameters()], xc
    assert frog.ForwardGradient(5, engine=engine).plan(shapes, like).keeps_blocks
    assert not frog.ForwardGradient(5, engine=engine, tangent_budget_mb=1e-6).plan(shapes, like).keeps_blocks
    kept, _ = fill(model, engine, loss_fn, "orthonormal", aggregation=aggregation, k=5, fd_step=1e-4)
    regenerated, _ = fill(model, engine, loss_fn, "orthonormal", aggregation=aggregation, k=5, fd_step=1e-4,
                          tangent_budget_mb=1e-6)
    ref = flat_grads(kept)
    torch.testing.assert_close(flat_grads(regenerated), ref, rtol=0, atol=1e-12 * float(ref.norm()))


def test_jvp_passes_hold_at_most_the_budgeted_rows():
    x = torch.randn(10, generator=gen(3), dtype=F64)
    seen = []

    def fn(p):
        seen.append(p["x"].shape)  # one call per vmap pass
        return frog.rosenbrock(p["x"])

    plan = frog.TangentPlan("normal", 5, [x.shape], seed=0, step=0, dtype=F64)
    budget_mb = 2 * 10 * 8 / 2**20
    _, chunked = make_engine("jvp", tangent_budget_mb=budget_mb)(fn, {"x": x}, plan)
    assert len(seen) == 3  # rows 0-1, 2-3, 4
    _, whole = make_engine("jvp")(fn, {"x": x}, plan)
    torch.testing.assert_close(chunked, whole, rtol=1e-14, atol=0)
    torch.testing.assert_close(chunked, plan.block(0) @ autograd_grad(frog.rosenbrock, x), rtol=1e-12, atol=0)
    _, some = make_engine("jvp", tangent_budget_mb=budget_mb)(fn, {"x": x}, plan, [4, 1, 3])
    torch.testing.assert_close(some, whole[[4, 1, 3]], rtol=1e-14, atol=0)


def test_tangent_budget_must_be_positive():
    for engine in ("jvp", "sim"):
        with pytest.raises(ValueError, match="tangent_budget_mb must be > 0"):
            frog.ForwardGradient(2, engine=engine, tangent_budget_mb=0)
