"""Weight perturbation (frog.weight_perturbation): a tangent block per parameter tensor, against autograd;
BatchNorm's running statistics updated once; the known modules using each weight, found once per model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import autograd_grad
from torch import nn

from frog.aggregation import Aggregator
from frog.engines import make_engine
from frog.interface import StepState, trainable_parameters
from frog.solver import Solver, TangentSettings
from frog.weight_perturbation import WeightPerturbation

F64 = torch.float64


def solver(k: int, sampler: str = "basis", engine: str = "jvp", rank: int = 1) -> Solver:
    return Solver(TangentSettings(k, sampler, rank=rank), make_engine(engine), Aggregator("project", k), StepState(seed=2))


def fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tanh(p["w"] @ p["b"]).sum() + (p["w"] ** 2).sum() * p["b"].sum()


def primals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(2, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim"])
@pytest.mark.parametrize("sampler", ["basis", "normal"])
def test_k_equal_n_tangents_give_the_exact_gradient(sampler, engine):
    """n = 9 entries, k = 9 tangents (the basis, or random ones that span R^9): the projection is grad fn."""
    p = primals()
    value, plan, coeffs = WeightPerturbation().solve(solver(9, sampler, engine), fn, p)
    assert value.item() == pytest.approx(fn(p).item(), rel=1e-14)
    expected = {"w": autograd_grad(lambda t: fn({"w": t, "b": p["b"]}), p["w"]),
                "b": autograd_grad(lambda t: fn({"w": p["w"], "b": t}), p["b"])}
    for b, name in enumerate(p):
        torch.testing.assert_close(plan.estimate(b, coeffs), expected[name], rtol=1e-10, atol=1e-12)


def test_fewer_tangents_give_the_projection_onto_their_span():
    p = primals()
    _, plan, coeffs = WeightPerturbation().solve(solver(4, "normal"), fn, p)
    tangents = torch.cat([plan.dense(b).reshape(4, -1) for b in range(2)], dim=1).double()  # (4, 9)
    g = torch.cat([autograd_grad(lambda t: fn({"w": t, "b": p["b"]}), p["w"]).flatten(),
                   autograd_grad(lambda t: fn({"w": p["w"], "b": t}), p["b"])])
    estimate = torch.cat([plan.estimate(b, coeffs).flatten() for b in range(2)])
    projection = tangents.T @ torch.linalg.lstsq(tangents.T, g.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(estimate, projection)
    assert not torch.allclose(estimate, g)


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim"])
def test_estimates_of_a_model_and_running_statistics_updated_once(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, momentum=0.5), nn.Linear(2, 1)).double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, dtype=F64)
    params = trainable_parameters(model)
    n = sum(p.numel() for p in params.values())  # 8 + 4 + 3 = 15
    strategy = WeightPerturbation()
    loss, pairs = strategy.estimates(solver(n, "basis", engine), model, lambda m: m(x).square().mean(), params,
                                     None, None)
    reference_loss = reference(x).square().mean()  # one plain pass: the statistics as they should be
    grads = torch.autograd.grad(reference_loss, list(reference.parameters()))
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-12)
    estimates = dict(pairs)
    assert list(estimates) == list(params)
    for (name, _), g in zip(reference.named_parameters(), grads, strict=True):
        torch.testing.assert_close(estimates[name], g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=0, atol=1e-15)
    assert int(model[1].num_batches_tracked) == 1


def test_weight_users_are_found_once_per_model_and_again_when_its_parameters_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    strategy = WeightPerturbation()
    params = trainable_parameters(model)
    users = strategy.weight_users(model, lambda m: m(x).sum(), params)
    assert users == {"0.weight": [model[0]], "2.weight": [model[2]]}
    assert strategy.weight_users(model, lambda m: m(x).sum(), params) is users  # cached
    model[2] = nn.Linear(4, 2)
    again = strategy.weight_users(model, lambda m: m(x).sum(), trainable_parameters(model))
    assert again is not users and again["2.weight"] == [model[2]]


def test_a_weight_used_outside_its_module_keeps_dense_tangents():
    """The second Linear's weight is also read by a hand-written matmul: only the first keeps its user."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(5, 3)

    def loss_fn(m):
        return m(x).sum() + (m[0](x) @ m[1].weight.T).sum()

    users = WeightPerturbation().weight_users(model, loss_fn, trainable_parameters(model))
    assert users == {"0.weight": [model[0]]}


def test_input_span_warns_once_per_matrix_it_cannot_see_the_inputs_of():
    """A function of named tensors has no modules: its matrices get low-rank tangents, with one warning."""
    strategy, p = WeightPerturbation(), primals()
    with pytest.warns(UserWarning, match=r"cannot see the inputs of w \(not the weight"):
        strategy.solve(solver(3, "input-span", "jvp", rank=1), fn, p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.solve(solver(3, "input-span", "jvp", rank=1), fn, p)
