"""frog.forward_mode.batchnorm: values and running statistics equal F.batch_norm's, jvps equal forward AD of batch
norm written out in plain operations (and of F.batch_norm), vjps pass gradcheck, and the engines give
the same estimates with and without the fused rule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import gen
from torch import nn
from torch.func import jvp, vmap

import frog
import frog.forward_mode.batchnorm
from frog.forward_mode.batchnorm import batch_norm, forward_mode_batch_norm, routed_batch_norm
from frog.training.models import make_model

F64 = torch.float64
SHAPES = {"1d (B, C)": (8, 3), "1d (B, C, L)": (4, 3, 5), "2d": (3, 3, 4, 5), "3d": (2, 3, 3, 2, 4)}
MODULES = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def inputs(shape, affine=True, dtype=F64, device="cpu", seed=0):
    """x (B, C, *), weight and bias (C,) (None without affine), positive running statistics (C,)."""
    g = gen(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    weight, bias = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
    stats = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    weight, bias = (weight.to(device), bias.to(device)) if affine else (None, None)
    return x.to(device), weight, bias, tuple(s.to(device) for s in stats)


def reference(x, weight=None, bias=None, eps=1e-5):
    """Train-mode batch norm in plain operations (biased variance over every dimension but 1)."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt((x - mean).square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


def original(x, weight=None, bias=None, eps=1e-5):
    """PyTorch's F.batch_norm in train mode (never routed: captured before any context)."""
    return frog.forward_mode.batchnorm._original(x, None, None, weight, bias, True, 0.1, eps)


def ours(x, weight=None, bias=None, eps=1e-5):
    return batch_norm(x, None, None, weight, bias, True, 0.1, eps)


# -- values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_values_equal_f_batch_norm(shape, affine, dtype):
    """Train mode: PyTorch's kernel, bit for bit; eval mode is F.batch_norm itself."""
    x, weight, bias, (mean, var) = inputs(shape, affine, dtype)
    assert torch.equal(ours(x, weight, bias), F.batch_norm(x, None, None, weight, bias, training=True))
    torch.testing.assert_close(ours(x, weight, bias), reference(x, weight, bias))
    evaluated = batch_norm(x, mean, var, weight, bias, training=False)
    assert torch.equal(evaluated, F.batch_norm(x, mean, var, weight, bias, training=False))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5)
    if affine:
        expected = expected * weight.view(shape) + bias.view(shape)
    torch.testing.assert_close(evaluated, expected)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_modules_in_the_context_equal_plain_modules(shape, train, momentum):
    """nn.BatchNorm1d/2d/3d called twice: outputs, running statistics and batch counts as without routing."""
    x, *_ = inputs(shape)
    torch.manual_seed(0)
    plain = MODULES[len(shape)](shape[1], momentum=momentum).double().train(train)
    nn.init.normal_(plain.weight)
    routed = copy.deepcopy(plain)
    expected = [plain(x), plain(x * 0.5 + 1)]
    with forward_mode_batch_norm():
        got = [routed(x), routed(x * 0.5 + 1)]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(routed.named_buffers())[name], buffer), name


def test_bad_arguments_raise_like_f_batch_norm():
    x = torch.randn(1, 3, dtype=F64)
    for fn in (F.batch_norm, batch_norm):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fn(x, None, None, training=True)
        with pytest.raises(ValueError, match="eps must be positive"):
            fn(torch.randn(4, 3, dtype=F64), None, None, training=True, eps=0.0)


# -- jvp and vjp ------------------------------------------------------------------------------------
TANGENTS = ["x", "weight", "bias", "weight+bias", "x+weight+bias", "x, no affine"]


def with_tangents(case, x, weight, bias):
    """(f, primals, tangents): batch norm as a function of the inputs of ``case`` (the others have no
    tangent) with random tangents for them."""
    names = case.replace(", no affine", "").split("+")
    if "no affine" in case:
        weight = bias = None
    given = {"x": x, "weight": weight, "bias": bias}
    primals = tuple(given[n] for n in names)
    g = gen(5)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in primals)

    def at(fn):
        def f(*args):
            values = {**given, **dict(zip(names, args, strict=True))}
            return fn(values["x"], values["weight"], values["bias"])
        return f

    return at, primals, tangents


@pytest.mark.parametrize("case", TANGENTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_jvp_equals_forward_ad_of_plain_batch_norm(shape, case):
    x, weight, bias, _ = inputs(shape)
    at, primals, tangents = with_tangents(case, x, weight, bias)
    out, d_out = jvp(at(ours), primals, tangents)
    for fn in (reference, original):
        ref_out, ref_d = jvp(at(fn), primals, tangents)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d_out, ref_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", TANGENTS)
def test_vmap_over_tangents_equals_one_jvp_per_tangent(case):
    """As the jvp engine runs it: k tangents batched by vmap around jvp, the primal unbatched."""
    x, weight, bias, _ = inputs(SHAPES["2d"])
    at, primals, _ = with_tangents(case, x, weight, bias)
    tangents = tuple(torch.randn(4, *p.shape, generator=gen(6), dtype=F64) for p in primals)

    def one(fn):
        return lambda *t: jvp(at(fn), primals, t)[1]

    batched = vmap(one(ours))(*tangents)
    torch.testing.assert_close(batched, torch.stack([one(ours)(*t) for t in zip(*tangents, strict=True)]),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(batched, vmap(one(reference))(*tangents), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(affine):
    """vjp (PyTorch's backward), its second derivative, the jvp and jvp under vmap against finite differences."""
    x, weight, bias, _ = inputs((4, 2, 3), affine)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]

    def fn(x, weight=None, bias=None):
        return ours(x, weight, bias)

    assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_vjp_equals_f_batch_norm():
    x, weight, bias, _ = inputs(SHAPES["2d"])
    cotangent = torch.randn(x.shape, generator=gen(7), dtype=F64)
    grads = []
    for fn in (ours, original):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grads.append(torch.autograd.grad((fn(*leaves) * cotangent).sum(), leaves))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- running statistics -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["plain", "jvp", "vmap(jvp)"])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_statistics_updated_as_f_batch_norm_does(momentum, how):
    """Given running statistics, a train-mode call updates them once, as F.batch_norm: also inside
    torch.func.jvp and vmap over tangents, where a buffer cannot be written from outside the kernel."""
    x, weight, bias, initial = inputs(SHAPES["2d"])
    expected, stats = [s.clone() for s in initial], [s.clone() for s in initial]
    want = F.batch_norm(x, *expected, weight, bias, training=True, momentum=momentum)

    def fn(x):
        return batch_norm(x, *stats, weight, bias, training=True, momentum=momentum)

    tangent = torch.randn(x.shape, generator=gen(8), dtype=F64)
    if how == "plain":
        got = fn(x)
    elif how == "jvp":
        got = jvp(fn, (x,), (tangent,))[0]
    else:
        got = vmap(lambda t: jvp(fn, (x,), (t,)))(tangent.expand(3, *x.shape))[0][0]
    assert torch.equal(got, want)
    for a, b in zip(stats, expected, strict=True):
        assert torch.equal(a, b)
    channels = x.transpose(0, 1).reshape(x.shape[1], -1)  # independent math: the unbiased variance for the running one
    torch.testing.assert_close(expected[0], (1 - momentum) * initial[0] + momentum * channels.mean(1))
    torch.testing.assert_close(expected[1], (1 - momentum) * initial[1] + momentum * channels.var(1, correction=1))


def test_batched_input_with_unbatched_running_statistics_fails_as_in_pytorch():
    """vmap over the data cannot write its batched statistics into the buffers (models.py: frog turns
    tracking off for such passes); without running statistics it runs, as PyTorch's does."""
    x, weight, bias, stats = inputs(SHAPES["2d"])
    xs = torch.stack([x, 2 * x])
    for fn in (F.batch_norm, batch_norm):
        with pytest.raises(RuntimeError, match="batched"):
            vmap(lambda x, fn=fn: fn(x, *[s.clone() for s in stats], weight, bias, training=True))(xs)
    torch.testing.assert_close(vmap(lambda x: ours(x, weight, bias))(xs), vmap(lambda x: reference(x, weight, bias))(xs))


# -- routing ----------------------------------------------------------------------------------------
def test_context_routes_and_restores(monkeypatch):
    before = F.batch_norm
    with pytest.raises(RuntimeError, match="inside"), forward_mode_batch_norm():
        assert F.batch_norm is routed_batch_norm
        with forward_mode_batch_norm():  # nested: still routed, no recursion
            x, weight, bias, _ = inputs(SHAPES["2d"])
            assert torch.equal(F.batch_norm(x, None, None, weight, bias, True), original(x, weight, bias))
        assert F.batch_norm is routed_batch_norm
        raise RuntimeError("inside")
    assert F.batch_norm is before
    monkeypatch.setattr(frog.forward_mode.batchnorm, "FUSED", False)
    with forward_mode_batch_norm():
        assert F.batch_norm is before


def count_routed(monkeypatch) -> list:
    """Records the input shape of every call that the context routes to :func:`batch_norm`."""
    calls = []

    def spy(input, *args, **kwargs):
        calls.append(input.shape)
        return batch_norm(input, *args, **kwargs)

    monkeypatch.setattr(frog.forward_mode.batchnorm, "batch_norm", spy)
    return calls


def test_devices_outside_fused_devices_keep_pytorchs_batch_norm(monkeypatch):
    calls = count_routed(monkeypatch)
    x, weight, bias, _ = inputs(SHAPES["2d"])
    with forward_mode_batch_norm():
        F.batch_norm(x, None, None, weight, bias, True)
        assert len(calls) == 1
        monkeypatch.setattr(frog.forward_mode.batchnorm, "FUSED_DEVICES", ())  # as CUDA tensors are treated
        assert torch.equal(F.batch_norm(x, None, None, weight, bias, True), original(x, weight, bias))
        assert len(calls) == 1


# -- the engines ------------------------------------------------------------------------------------
def make_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True),  # in place after BN
                          nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2, affine=False), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=None), nn.Linear(6, 3))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return model.double().train()


def cnn_data(batch=5):
    g = gen(11)
    return torch.randn(batch, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (batch,), generator=g)


def estimate(model, engine, perturbation, loss, k=4, sampler="normal", fused=True, monkeypatch=None):
    """(p.grad of every parameter, buffers) after one fill_grad on a copy of ``model``."""
    model = copy.deepcopy(model)
    monkeypatch.setattr(frog.forward_mode.batchnorm, "FUSED", fused)
    fg = frog.ForwardGradient(k, engine=engine, perturbation=perturbation, sampler=sampler, seed=3)
    fg.fill_grad(model, lambda m: loss(m, "none" if perturbation == "activity" else "mean"))
    monkeypatch.setattr(frog.forward_mode.batchnorm, "FUSED", True)
    return [p.grad for p in model.parameters()], dict(model.named_buffers())


@pytest.mark.parametrize("perturbation", ["weight", "activity"])
@pytest.mark.parametrize("engine", ["jvp", "loop"])
def test_engines_give_the_same_estimate_with_and_without_the_fused_rule(engine, perturbation, monkeypatch):
    """BatchNorm1d/2d, affine or not, momentum or cumulative, an in-place ReLU after BatchNorm; the
    weights of BatchNorm carry tangents with weight perturbation, none with activity perturbation."""
    model = make_cnn()
    x, y = cnn_data()

    def loss(m, reduction):
        return F.cross_entropy(m(x), y, reduction=reduction)

    calls = count_routed(monkeypatch)
    fused, fused_buffers = estimate(model, engine, perturbation, loss, monkeypatch=monkeypatch)
    assert len(calls) == 3 * (1 if engine == "jvp" else 4)  # three layers, each pass (k = 4 for loop)
    plain, plain_buffers = estimate(model, engine, perturbation, loss, fused=False, monkeypatch=monkeypatch)
    assert len(calls) == 3 * (1 if engine == "jvp" else 4)
    sim, sim_buffers = estimate(model, "sim", perturbation, loss, monkeypatch=monkeypatch)
    assert all(float(g.norm()) > 0 for g in fused)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if perturbation == "weight":  # forward mode and sim agree when the tangents perturb weights
        for a, b in zip(fused, sim, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for name, buffer in sim_buffers.items():  # running statistics updated once, as by one plain pass
        assert torch.equal(fused_buffers[name], buffer) and torch.equal(plain_buffers[name], buffer), name


@pytest.mark.parametrize("engine", ["jvp", "loop"])
def test_k_equals_n_basis_tangents_give_the_exact_gradient(engine, monkeypatch):
    """Weight perturbation with all n basis vectors: the projection is exact, so the estimate is
    autograd's gradient of the train-mode loss (batch statistics differentiated too)."""
    model = make_cnn()
    x, y = cnn_data()

    def loss(m, reduction):
        return F.cross_entropy(m(x), y, reduction=reduction)

    n = sum(p.numel() for p in model.parameters())
    calls = count_routed(monkeypatch)
    grads, _ = estimate(model, engine, "weight", loss, k=n, sampler="basis", monkeypatch=monkeypatch)
    assert calls
    exact = copy.deepcopy(model)
    loss(exact, "mean").backward()
    for got, want in zip(grads, (p.grad for p in exact.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_resnet18_activity_estimate_with_and_without_the_fused_rule(monkeypatch):
    torch.manual_seed(0)
    model = make_model("resnet18", (1, 8, 8), 10).double().train()
    x = torch.randn(4, 1, 8, 8, generator=gen(12), dtype=F64)  # layer4 is 1x1: BN needs > 1 value a channel
    y = torch.arange(4)

    def loss(m, reduction):
        return F.cross_entropy(m(x), y, reduction=reduction)

    calls = count_routed(monkeypatch)
    fused, _ = estimate(model, "jvp", "activity", loss, k=2, monkeypatch=monkeypatch)
    assert len(calls) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    plain, _ = estimate(model, "jvp", "activity", loss, k=2, fused=False, monkeypatch=monkeypatch)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# -- CUDA -------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", TANGENTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_cuda_values_and_jvps(shape, case):
    x, weight, bias, stats = inputs(shape, dtype=torch.float32, device="cuda")
    at, primals, tangents = with_tangents(case, x, weight, bias)
    out, d_out = jvp(at(ours), primals, tangents)
    torch.testing.assert_close(out, at(original)(*primals), rtol=1e-5, atol=1e-5)
    _, ref_d = jvp(at(reference), primals, tangents)
    torch.testing.assert_close(d_out, ref_d, rtol=1e-4, atol=1e-4)
    batched = tuple(torch.stack([t, 2 * t, -t]) for t in tangents)
    torch.testing.assert_close(vmap(lambda *t: jvp(at(ours), primals, t)[1])(*batched),
                               torch.stack([d_out, 2 * d_out, -d_out]), rtol=1e-4, atol=1e-4)
    ours_stats, theirs_stats = [s.clone() for s in stats], [s.clone() for s in stats]
    batch_norm(x, *ours_stats, weight, bias, training=True)
    F.batch_norm(x, *theirs_stats, weight, bias, training=True)
    for a, b in zip(ours_stats, theirs_stats, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
