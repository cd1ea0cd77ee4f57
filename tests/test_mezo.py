"""MeZO (frog.mezo): zeroth-order SPSA with in-place perturbations, against autograd, and in frog train."""

from __future__ import annotations

import math

import pytest
import torch
from resume import assert_resume_is_identical
from torch import nn

from frog.mezo import MeZO


def small_model(dtype=torch.float64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3)).to(dtype)


def batch(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=generator, dtype=dtype), torch.randint(0, 3, (16,), generator=generator)


def loss_of(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def autograd_gradient(model: nn.Module, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn(model).backward()
    grad = flat(p.grad for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return grad


def test_mezo_perturbation_restores_the_weights():
    """+eps z, -2 eps z, +eps z in place returns every weight up to the rounding of its last bit."""
    model = small_model(torch.float32)
    x, y = batch(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    MeZO(eps=1e-3, directions=3, seed=4).projected_gradients(model, loss_of(x, y))
    for old, new in zip(before, model.parameters(), strict=True):
        ulp = torch.finfo(torch.float32).eps * old.abs().clamp_min(1e-3)  # a unit in the last place, about
        assert ((new - old).abs() <= 2 * ulp).all()
        assert (new - old).abs().max() < 1e-3 * 1e-3  # far below the perturbation, eps |z|


def test_mezo_estimate_is_unbiased_against_autograd():
    """The mean of many seeds' estimates (1/q) sum g_j z_j approaches the gradient at the rate
    sqrt((n + 1) / directions) of Gaussian SPSA."""
    model = small_model()
    x, y = batch()
    loss_fn = loss_of(x, y)
    true = autograd_gradient(model, loss_fn)
    seeds, directions = 8, 1500
    total = torch.zeros_like(true)
    for seed in range(seeds):
        MeZO(eps=1e-4, directions=directions, seed=seed).fill_grad(model, loss_fn)
        total += flat(p.grad for p in model.parameters())
    mean = total / seeds
    n = true.numel()
    expected = math.sqrt((n + 1) / (seeds * directions))
    assert (mean - true).norm() / true.norm() < 3 * expected
    one = MeZO(eps=1e-4, directions=1, seed=0)
    one.fill_grad(model, loss_fn)  # a single direction is far from the gradient: the test can fail
    assert (flat(p.grad for p in model.parameters()) - true).norm() / true.norm() > 3 * expected


def test_mezo_projected_gradient_is_the_directional_derivative_with_the_same_dropout_mask():
    model = small_model(dropout=0.5)
    x, y = batch()
    loss_fn = loss_of(x, y)
    mezo = MeZO(eps=1e-5, directions=2, seed=3)
    state = torch.get_rng_state()
    _, projected = mezo.projected_gradients(model, loss_fn)
    torch.set_rng_state(state)  # the mask of MeZO's passes
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    for j in range(2):
        z = [mezo.direction(p, 0, j, i) for i, p in enumerate(model.parameters())]
        assert projected[j].item() == pytest.approx(float(flat(z) @ flat(grads)), rel=1e-6, abs=1e-9)


def test_mezo_update_equals_fill_grad_and_sgd():
    model_a, model_b = small_model(), small_model()
    x, y = batch()
    MeZO(eps=1e-3, directions=2, seed=5).update(model_a, loss_of(x, y), lr=0.1)
    MeZO(eps=1e-3, directions=2, seed=5).fill_grad(model_b, loss_of(x, y))
    torch.optim.SGD(model_b.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in model_a.parameters())
    torch.testing.assert_close(flat(model_a.parameters()), flat(model_b.parameters()), rtol=0, atol=1e-12)


def test_mezo_clear_errors():
    model = small_model()
    x, y = batch()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        MeZO().update(model, loss_of(x, y), lr=-1.0)
    with pytest.raises(ValueError, match="directions must be an integer >= 1"):
        MeZO(directions=0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        MeZO(eps=0.0)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        MeZO().fill_grad(model, lambda m: nn.functional.cross_entropy(m(x), y, reduction="none"))


def test_mezo_resumes_with_the_same_directions():
    model_a, model_b = small_model(), small_model()
    x, y = batch()
    first = MeZO(seed=7)
    for _ in range(3):
        first.update(model_a, loss_of(x, y), lr=0.01)
    second = MeZO(seed=7)
    for _ in range(2):
        second.update(model_b, loss_of(x, y), lr=0.01)
    resumed = MeZO(seed=0)
    resumed.load_state_dict(second.state_dict())
    resumed.update(model_b, loss_of(x, y), lr=0.01)
    assert torch.equal(flat(model_a.parameters()), flat(model_b.parameters()))


def test_frog_train_runs_mezo_and_resumes_bit_identically(tmp_path, capsys):
    from frog.cli import main
    from frog.training.train import TrainConfig

    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="mezo", num_tangents=2, lr=0.01,
                         batch_size=64, epochs=2)
    straight, _ = assert_resume_is_identical(config, tmp_path)
    assert int(straight[-1]["steps"]) == 2 * 17  # one call per batch (the digits training split, batch 64)
    assert main(["train", "--gradient", "mezo", "--out", str(tmp_path / "c")]) == 2
    assert "--gradient mezo has no step-size table: give --lr" in capsys.readouterr().err
