"""Structured weight tangents through known layers (docs/guides/structured-tangents.md): every engine gives the orthogonal
projection of the autograd gradient onto the span of the tangents formed densely (least squares),
without forming them; input-span tangents lie in the span of each layer's inputs."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import gen, lstsq_projection, rel_err
from torch import nn
from torch.nn import functional as F

import frog
from frog import layouts
from frog.tangents import TangentPlan

F64 = torch.float64
ENGINES = ("jvp", "loop", "sim", "fd")
TOL = {"jvp": 1e-9, "loop": 1e-9, "sim": 1e-9, "fd": 1e-5}


class TiedLM(nn.Module):
    """Embedding whose weight the output Linear shares, plus a weight used in a hand-written matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.gate = nn.Linear(4, 4)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.embed(idx)))
        h = h + torch.sigmoid(h @ self.gate.weight.T + self.gate.bias)  # gate.weight used outside its module's forward
        return self.head(h).mean(1)


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, dilation=1),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.Tanh(),
                         nn.Conv1d(3, 2, 2, stride=2, padding_mode="reflect", padding=1), nn.Flatten(), nn.Linear(8, 3))


class InPlace(nn.Module):
    """Layers without bias whose outputs are changed in place (ReLU(inplace=True), +=), a Linear on
    (B, T, C) inputs: sim must take each layer's output gradient before the in-place change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.token = nn.Linear(4, 5, bias=False)
        self.out = nn.Linear(3 * 5, 3)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(2)  # (B, 3, 16)
        t = self.token(h.reshape(*h.shape[:2], 4, 4).mean(-1))  # (B, 3, 5)
        t.mul_(1.5).add_(0.1)
        return self.out(torch.tanh(t).flatten(1))


MODELS = {  # builder, input, number of classes
    "mlp": (mlp, lambda: torch.randn(4, 6, generator=gen(1), dtype=F64)),
    "cnn": (cnn, lambda: torch.randn(2, 2, 4, 4, generator=gen(1), dtype=F64)),
    "conv1d": (conv1d, lambda: torch.randn(3, 2, 7, generator=gen(1), dtype=F64)),
    "tied": (TiedLM, lambda: torch.tensor([[1, 2, 0, 3], [4, 5, 6, 0]])),
    "inplace": (InPlace, lambda: torch.randn(2, 2, 4, 4, generator=gen(1), dtype=F64)),
}


def setup(name):
    build, make_x = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    x = make_x()
    y = torch.arange(x.shape[0]) % 3
    return model, (lambda m: F.cross_entropy(m(x), y)), x


def true_gradient(model, loss_fn):
    model.zero_grad()
    loss_fn(model).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g


def estimate(model, loss_fn, **options):
    """The plain projection's estimate (no length correction), flat (n,)."""
    fg = frog.ForwardGradient(**{"num_tangents": 6, "seed": 3, "scale_correction": False, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fg.fill_grad(model, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def dense_tangents(model, k, kind, rank, seed=3, step=0, bases=None, span=()):
    """The call's tangents formed densely (k, n) from an independent plan with the same key."""
    shapes = [p.shape for p in model.parameters()]
    plan = TangentPlan(kind, k, shapes, seed=seed, step=step, dtype=F64, rank=rank, span=span)
    for b, basis in (bases or {}).items():
        plan.set_basis(b, basis)
    return torch.cat([plan.dense(b).reshape(k, -1) for b in range(len(shapes))], dim=1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("engine", ENGINES)
def test_lowrank_estimate_is_the_projection_onto_the_dense_tangents(name, rank, engine):
    model, loss_fn, _ = setup(name)
    g = true_gradient(model, loss_fn)
    got = estimate(model, loss_fn, sampler="lowrank", rank=rank, engine=engine)
    expected = lstsq_projection(dense_tangents(model, 6, "lowrank", rank), g)
    assert rel_err(got, expected) < TOL[engine]


def input_bases(model, x):
    """Q of every Linear/Conv weight whose inputs span less than the whole space, by QR of the inputs
    (or input patches) captured with hooks: independent of frog's layers module."""
    params = {id(p): b for b, p in enumerate(model.parameters())}
    bases = {}

    def capture(module, args, output):
        x = args[0]
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, module.in_features)
        elif isinstance(module, nn.Conv2d):
            rows = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            rows = rows.reshape(-1, rows.shape[-1])
        else:
            return
        if rows.shape[0] < rows.shape[1]:
            bases.setdefault(params[id(module.weight)], torch.linalg.qr(rows.T)[0])

    handles = [m.register_forward_hook(capture) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return bases


@pytest.mark.parametrize("name", ["mlp", "cnn", "inplace"])
@pytest.mark.parametrize("engine", ENGINES)
def test_input_span_estimate_is_the_projection_onto_tangents_in_the_input_span(name, engine):
    model, loss_fn, x = setup(name)
    g = true_gradient(model, loss_fn)
    got = estimate(model, loss_fn, sampler="input-span", rank=1, engine=engine)
    shapes = [p.shape for p in model.parameters()]
    span = [b for b, s in enumerate(shapes) if len(s) >= 2]
    bases = input_bases(model, x)
    assert bases, "some layer must see fewer inputs than its width"
    tangents = dense_tangents(model, 6, "input-span", 1, bases=bases, span=span)
    assert rel_err(got, lstsq_projection(tangents, g)) < TOL[engine]
    offsets = [0, *torch.tensor([s.numel() for s in shapes]).cumsum(0).tolist()]
    for b, basis in bases.items():  # every right factor lies in the span of the inputs
        rows = tangents[:, offsets[b]:offsets[b + 1]].reshape(6 * shapes[b][0], -1)
        torch.testing.assert_close(rows @ basis @ basis.T, rows)


def test_enough_lowrank_tangents_give_the_exact_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = torch.randn(5, 3, generator=gen(1), dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    loss_fn = lambda m: F.cross_entropy(m(x), y)
    n = sum(p.numel() for p in model.parameters())
    g = true_gradient(model, loss_fn)
    for engine in ("jvp", "sim"):
        got = estimate(model, loss_fn, num_tangents=n, sampler="lowrank", engine=engine)
        assert rel_err(got, g) < 1e-8


def test_input_span_with_one_sample_gives_the_exact_gradient_of_a_linear_layer():
    """Batch 1: the weight gradient delta x^T lies in {u x^T}, so out + bias = 2 out tangents span it."""
    torch.manual_seed(0)
    model = nn.Linear(9, 4).double()
    x = torch.randn(1, 9, generator=gen(2), dtype=F64)
    loss_fn = lambda m: torch.tanh(m(x)).pow(2).sum()
    g = true_gradient(model, loss_fn)
    for engine in ENGINES:
        got = estimate(model, loss_fn, num_tangents=8, sampler="input-span", engine=engine)
        assert rel_err(got, g) < TOL[engine]
    assert rel_err(estimate(model, loss_fn, num_tangents=8, sampler="lowrank"), g) > 0.01  # plain low rank is not


@pytest.mark.parametrize("kind", ["lowrank", "input-span"])
def test_length_correction_gives_the_gradient_length_on_average(kind):
    """The default estimate's length averages the gradient's: for input-span the correction uses
    the dimension the tangents span (out x batch here, 32 x 4), not the weight's (32 x 256)."""
    torch.manual_seed(0)
    model = nn.Linear(256, 32, bias=False).double()
    x = torch.randn(4, 256, generator=gen(5), dtype=F64)
    target = torch.randn(4, 32, generator=gen(6), dtype=F64)
    loss_fn = lambda m: (m(x) - target).pow(2).sum()
    g = true_gradient(model, loss_fn)
    fg = frog.ForwardGradient(8, sampler=kind, seed=0)
    ratios = []
    for _ in range(200):
        fg.fill_grad(model, loss_fn)
        ratios.append((model.weight.grad.norm() / g.norm()).item())
    assert 0.8 < sum(ratios) / len(ratios) < 1.25


@pytest.mark.parametrize("kind", ["lowrank", "input-span"])
def test_engines_never_form_dense_weight_tangents(monkeypatch, kind):
    model, loss_fn, _ = setup("cnn")

    def forbidden(self, raw):
        raise AssertionError("a dense weight tangent was formed")

    monkeypatch.setattr(layouts.LowRank, "dense", forbidden)
    for engine in ENGINES:
        estimate(model, loss_fn, sampler=kind, engine=engine)


@pytest.mark.parametrize("kind", ["lowrank", "input-span"])
def test_same_seed_same_numbers(kind):
    model, loss_fn, _ = setup("mlp")
    runs = [estimate(model, loss_fn, sampler=kind, rank=2, engine="jvp") for _ in range(2)]
    assert torch.equal(*runs)


def test_lowrank_grad_of_a_matrix_and_state_dict_resume():
    a = torch.randn(5, 4, generator=gen(0), dtype=F64)
    fn = lambda x: (torch.tanh(x @ a.T) ** 2).sum()
    x = torch.randn(3, 4, generator=gen(1), dtype=F64)
    fg = frog.ForwardGradient(5, sampler="lowrank", rank=2, seed=4, scale_correction=False)
    fg.grad(fn, x)
    state = fg.state_dict()
    second = fg.grad(fn, x)
    g = torch.autograd.functional.jacobian(fn, x)
    plan = TangentPlan("lowrank", 5, [x.shape], seed=4, step=1, dtype=F64, rank=2)
    torch.testing.assert_close(second, lstsq_projection(plan.dense(0), g))
    resumed = frog.ForwardGradient(5, sampler="lowrank", rank=2, seed=0, scale_correction=False)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.grad(fn, x), second)


def test_input_span_falls_back_to_lowrank_with_one_warning():
    model, loss_fn, _ = setup("tied")
    fg = frog.ForwardGradient(4, sampler="input-span", seed=0)
    with pytest.warns(UserWarning, match=r"embed\.weight.*lowrank") as caught:
        fg.fill_grad(model, loss_fn)
    assert "gate.weight" in str(caught[0].message) and "mix.weight" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fg.fill_grad(model, loss_fn)  # no second warning


def test_weights_used_outside_their_module_are_not_routed():
    model, loss_fn, _ = setup("tied")
    fg = frog.ForwardGradient(4, sampler="lowrank", seed=0)
    params = dict(model.named_parameters())
    users = fg.weight_users(model, loss_fn, params)
    assert set(users) == {"embed.weight", "mix.weight"}  # tied into head (known) and mix; gate is used by hand
    assert {type(m) for m in users["embed.weight"]} == {nn.Embedding, nn.Linear}


def test_structured_tangents_bad_input():
    model, loss_fn, _ = setup("mlp")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        frog.ForwardGradient(4, sampler="lowrank", rank=0)
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(m, n\) = 3 of 4\.weight"):
        frog.ForwardGradient(4, sampler="lowrank", rank=4).fill_grad(model, loss_fn)
    for kind in ("lowrank", "input-span"):
        with pytest.raises(ValueError, match="perturbation='weight'"):
            frog.ForwardGradient(4, sampler=kind, perturbation="activity")
    with pytest.raises(ValueError, match="only used with sampler='lowrank'"):
        frog.ForwardGradient(4, sampler="normal", rank=2)
    with pytest.raises(ValueError, match="distributed data mode"):
        frog.ForwardGradient(4, sampler="input-span", communicator=SimpleNamespace(mode="data"))
