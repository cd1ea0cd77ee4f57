"""One forward-gradient measurement (frog.solver.Solver): the plan keeps or regenerates the tangents by the
budget with the same numbers either way, the coefficients are the least-squares projection's, and every
measurement advances the call counter once its jvps are known to be finite."""

from __future__ import annotations

import pytest
import torch
from conftest import autograd_grad, lstsq_projection

from frog.aggregation import Aggregator
from frog.engines import make_engine
from frog.errors import NonFiniteError
from frog.interface import StepState
from frog.solver import Solver, TangentSettings

F64 = torch.float64
SHAPES = [torch.Size([3, 4]), torch.Size([5])]  # n = 17
K = 6


def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return (p["w"].sin() * torch.arange(12.0, dtype=F64).reshape(3, 4)).sum() + (p["b"] ** 3).sum()


def primals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(5, generator=g, dtype=F64)}


def solver(budget_bytes: float, engine: str = "jvp", state: StepState | None = None) -> Solver:
    return Solver(TangentSettings(K, budget_bytes=budget_bytes), make_engine(engine), Aggregator("project", K),
                  state or StepState(seed=7))


def flat_gradient() -> torch.Tensor:
    p = primals()
    w = autograd_grad(lambda t: loss({"w": t, "b": p["b"]}), p["w"])
    b = autograd_grad(lambda t: loss({"w": p["w"], "b": t}), p["b"])
    return torch.cat([w.flatten(), b.flatten()])


def test_plan_keeps_the_tangents_exactly_when_k_of_them_fit_the_budget():
    like = torch.zeros((), dtype=F64)
    fits = K * 17 * 8  # k rows of n float64 entries
    assert solver(fits).plan(SHAPES, like).keeps_blocks
    assert not solver(fits - 1).plan(SHAPES, like).keeps_blocks
    assert solver(fits).plan(SHAPES, like.float()).keeps_blocks  # float32 takes half


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim"])
def test_kept_and_regenerated_tangents_give_identical_coefficients(engine):
    results = []
    for budget in (1e9, 1.0):
        s = solver(budget, engine)
        plan = s.plan(SHAPES, torch.zeros((), dtype=F64), ["w", "b"])
        value, coeffs = s.measure(loss, primals(), plan)
        estimate = torch.cat([plan.estimate(b, coeffs).flatten() for b in range(2)])
        tangents = torch.cat([plan.dense(b).reshape(K, -1) for b in range(2)], dim=1)
        results.append((plan.keeps_blocks, value, coeffs, estimate, tangents))
    (kept, *first), (regenerated, *second) = results
    assert kept and not regenerated
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    value, _, estimate, tangents = first
    assert value.item() == pytest.approx(loss(primals()).item())
    torch.testing.assert_close(estimate, lstsq_projection(tangents, flat_gradient()))  # the projection of g


def test_coefficients_advance_the_call_counter_and_the_next_plan_draws_new_tangents():
    state = StepState(seed=7)
    s = solver(1e9, state=state)
    like = torch.zeros((), dtype=F64)
    first = s.plan(SHAPES, like)
    s.measure(loss, primals(), first)
    assert state.calls == 1
    first_block = first.block(0).clone()  # the engine reuses the memory of kept tangents in the next step
    second = s.plan(SHAPES, like)
    assert second.step == 1 and not torch.equal(second.block(0), first_block)
    second_block = second.block(0).clone()
    state.held = True  # within same_tangents: the counter stays, the tangents too
    s.measure(loss, primals(), second)
    assert state.calls == 1 and torch.equal(s.plan(SHAPES, like).block(0), second_block)


def test_non_finite_jvps_or_loss_raise_and_do_not_advance():
    state = StepState(seed=7)
    s = solver(1e9, state=state)
    plan = s.plan(SHAPES, torch.zeros((), dtype=F64))
    jvps = torch.ones(K, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"^step 0: the jvps became non-finite"):
        s.coefficients(plan, torch.tensor(1.0, dtype=F64), torch.cat([jvps[:-1], torch.tensor([float("nan")])]))
    with pytest.raises(NonFiniteError, match=r"^step 0: the loss became non-finite"):
        s.coefficients(plan, torch.tensor(float("inf"), dtype=F64), jvps)
    assert state.calls == 0
    with pytest.raises(NonFiniteError, match=r"^step 0: the jvps"):  # through the engine: sqrt'(0) is infinite
        s.measure(lambda p: loss(p) + (p["b"] - p["b"].detach()).abs().sqrt().sum(), primals(), plan)
    assert state.calls == 0
    s.coefficients(plan, torch.tensor(1.0, dtype=F64), jvps)
    assert state.calls == 1
