"""The estimators' shared interface (frog.interface): fill_grad and update built on estimates, the gradient
writes, the trainable parameters, the call counter and its checkpoint form, the finiteness check and the
per-sample loss contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import frog
from frog.interface import (
    GradientEstimator,
    StepEstimates,
    StepState,
    check_finite,
    per_sample_losses,
    trainable_parameters,
    write_grads,
)

F64 = torch.float64


class Exact(GradientEstimator):
    """An estimator whose estimate is autograd's gradient, recording how it was asked."""

    def __init__(self) -> None:
        self.state = StepState(seed=3)
        self.asked: list[dict] = []

    def estimates(self, model, loss_fn, *, targets=None, release_grads=False):
        self.asked.append({"targets": targets, "release_grads": release_grads})
        params = trainable_parameters(model)
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, list(params.values()))
        self.state.advance()
        return StepEstimates(loss.detach(), params, iter(zip(params, grads, strict=True)))

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state):
        self.state.load_state_dict(state)


def model_and_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=F64)
    return model, lambda m: m(x).square().mean()


def autograd_of(model, loss_fn):
    return torch.autograd.grad(loss_fn(model), list(model.parameters()))


def test_fill_grad_sets_and_accumulates_the_estimates():
    model, loss_fn = model_and_loss()
    exact = autograd_of(model, loss_fn)
    estimator = Exact()
    loss = estimator.fill_grad(model, loss_fn, targets="labels")
    assert loss.item() == pytest.approx(loss_fn(model).item()) and not loss.requires_grad
    for p, g in zip(model.parameters(), exact, strict=True):
        torch.testing.assert_close(p.grad, g)
    estimator.fill_grad(model, loss_fn, accumulate=True)
    for p, g in zip(model.parameters(), exact, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)
    # the buffers are dropped before the passes unless the estimate adds to them
    assert estimator.asked == [{"targets": "labels", "release_grads": True}, {"targets": None, "release_grads": False}]
    assert estimator.calls == 2


def test_update_is_an_sgd_step_without_gradient_buffers():
    model, loss_fn = model_and_loss()
    reference = [p.detach().clone() for p in model.parameters()]
    exact = autograd_of(model, loss_fn)
    Exact().update(model, loss_fn, lr=0.25)
    for p, before, g in zip(model.parameters(), reference, exact, strict=True):
        assert p.grad is None
        torch.testing.assert_close(p.detach(), before - 0.25 * g, rtol=0, atol=1e-15)
    for lr in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            Exact().update(model, loss_fn, lr=lr)


def test_write_grads():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    params = {"a": a, "b": b}
    write_grads(params, [("a", torch.ones(2))], accumulate=True)  # nothing to add to: set
    assert torch.equal(a.grad, torch.ones(2)) and b.grad is None
    write_grads(params, [("a", torch.full((2,), 2.0)), ("b", torch.ones(3))], accumulate=True)
    assert torch.equal(a.grad, torch.full((2,), 3.0)) and torch.equal(b.grad, torch.ones(3))
    write_grads(params, [("a", torch.full((2,), 5.0))], accumulate=False)
    assert torch.equal(a.grad, torch.full((2,), 5.0)) and torch.equal(b.grad, torch.ones(3))


def test_trainable_parameters():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(2, 1))
    model[3].bias.requires_grad_(False)
    params = trainable_parameters(model)
    assert list(params) == ["0.weight", "0.bias", "3.weight"]  # tied once, frozen left out
    assert params["3.weight"] is model[3].weight
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
        trainable_parameters(lambda x: x)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        trainable_parameters(model)


def test_step_state_advances_unless_held_and_round_trips():
    state = StepState(seed=4)
    state.advance()
    state.advance()
    assert state.calls == 2
    state.held = True
    state.advance()
    assert state.calls == 2
    assert state.state_dict() == {"seed": 4, "calls": 2}
    other = StepState()
    other.load_state_dict(state.state_dict())
    assert (other.seed, other.calls, other.held) == (4, 2, False)


def test_step_state_reads_checkpoints_of_frog_0_1_0():
    """They name the counter ``step``; a state without a seed keeps the estimator's."""
    state = StepState(seed=9)
    state.load_state_dict({"step": 7})
    assert (state.seed, state.calls) == (9, 7)
    state.load_state_dict({"seed": 1, "step": 3})
    assert (state.seed, state.calls) == (1, 3)
    with pytest.raises(KeyError):
        state.load_state_dict({"seed": 1})


def test_estimators_keep_their_counter_in_a_step_state():
    """The counter is what a checkpoint restores: ForwardGradient and MeZO go on with the same numbers."""
    model, loss_fn = model_and_loss()
    for make in (lambda: frog.ForwardGradient(2, seed=5), lambda: frog.MeZO(seed=5)):
        first = make()
        first.fill_grad(model, loss_fn)
        assert first.calls == 1 and first.state_dict() == {"seed": 5, "calls": 1}
        again = make()
        again.load_state_dict({"seed": 5, "step": 1})  # as frog 0.1.0 wrote it
        twin = copy.deepcopy(model)  # MeZO moves the weights it perturbs by a rounding
        first.fill_grad(model, loss_fn)
        again.fill_grad(twin, loss_fn)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        fresh = make()  # call 0 again: other random numbers
        fresh.fill_grad(twin, loss_fn)
        assert not torch.equal(twin[0].weight.grad, model[0].weight.grad)


def test_check_finite_names_the_call_and_what_diverged():
    check_finite(3, torch.tensor(1.0), torch.tensor([1.0, -2.0]))
    check_finite(3, torch.tensor([1.0, 2.0]))
    with pytest.raises(frog.NonFiniteError, match=r"^step 4: the loss became non-finite \(loss nan\).*smaller"):
        check_finite(4, torch.tensor(float("nan")), torch.tensor([1.0]))
    with pytest.raises(frog.NonFiniteError, match=r"^step 5: the jvps became non-finite \(loss 2.0\)"):
        check_finite(5, torch.tensor(2.0), torch.tensor([1.0, float("inf")]))
    with pytest.raises(frog.NonFiniteError, match="the loss"):  # the loss first
        check_finite(6, torch.tensor([1.0, float("-inf")]), torch.tensor([float("nan")]))


def test_per_sample_losses():
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert per_sample_losses(losses) is losses
    tokens = torch.arange(6.0).reshape(2, 3)  # (B, T): the mean over the tokens
    assert torch.equal(per_sample_losses(tokens), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match=r"reduction='none'.*got \(\)$"):
        per_sample_losses(torch.tensor(1.0))
    with pytest.raises(ValueError, match="got float$"):
        per_sample_losses(1.0)
