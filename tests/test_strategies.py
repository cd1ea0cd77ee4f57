"""Step-size strategies: the Armijo line search and normalized steps against independent math."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import autograd_grad, gen
from resume import assert_resume_is_identical

from frog import ForwardGradient
from frog.training.optimize import gradient_descent
from frog.training.strategies import ArmijoLineSearch, NormalizedSGD, make_optimizer, module_loss_at, take_step


def quadratic(n: int, seed: int):
    """f(x) = 0.5 x^T A x - b^T x with A symmetric positive definite (condition about 100)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen(seed + 1), dtype=torch.float64)
    return lambda x: 0.5 * x @ a @ x - b @ x


@pytest.mark.parametrize("aggregation", ["project", "mean"])
def test_line_search_decreases_a_convex_function_at_every_step(aggregation):
    fn = quadratic(12, 0)
    x = torch.zeros(12, dtype=torch.float64)
    opt = ArmijoLineSearch([x], lr=1.0)
    fg = ForwardGradient(3, aggregation, seed=1)
    values = [float(fn(x))]
    for _ in range(40):
        before = x.clone()
        _, x.grad = fg.value_and_grad(fn, x)
        slope = float(autograd_grad(fn, before) @ -x.grad)  # <grad f, d>, independent of the line search
        take_step(opt, lambda tensors: fn(tensors[0]))
        t = opt.param_groups[0]["step_size"]
        values.append(float(fn(x)))
        assert values[-1] < values[-2]  # a descent direction on a convex quadratic: a step is always taken
        assert torch.allclose(x, before - t * x.grad), "the step is t along -g"
        assert values[-1] <= values[-2] + 1e-4 * t * slope + 1e-12  # Armijo against autograd's slope
    x_star = torch.linalg.solve(torch.func.hessian(fn)(x), -torch.func.grad(fn)(torch.zeros_like(x)))  # A^-1 b
    minimum = float(fn(x_star))
    assert values[-1] - minimum < 0.2 * (values[0] - minimum)


def test_line_search_takes_no_step_along_an_ascent_direction():
    fn = quadratic(5, 3)
    x = torch.ones(5, dtype=torch.float64)
    x.grad = -autograd_grad(fn, x)  # d = -g = +grad: f increases along d
    opt = ArmijoLineSearch([x])
    before = x.clone()
    opt.step(lambda tensors: fn(tensors[0]))
    assert torch.equal(x, before)
    assert opt.param_groups[0]["evaluations"] == 1  # only the jvp


def test_line_search_in_gradient_descent_counts_its_passes():
    fn = quadratic(8, 5)
    fg = ForwardGradient(2, "project", seed=0)
    result = gradient_descent(fn, torch.zeros(8, dtype=torch.float64), None, 25, fg, optimizer="line-search")
    # at least the jvp and one trial per step
    assert result.extra_forward_passes >= 2 * 25
    assert result.best_value < float(fn(torch.zeros(8, dtype=torch.float64)))


def test_normalized_steps_have_length_lr_over_sqrt_t():
    params = [torch.zeros(3), torch.zeros(2, 2)]
    opt = NormalizedSGD(params, lr=0.5)
    for t in range(4):
        before = torch.cat([p.flatten().clone() for p in params])
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen(10 * t + i)) * 10 ** t
        opt.step()
        moved = torch.cat([p.flatten() for p in params]) - before
        direction = -torch.cat([p.grad.flatten() for p in params])
        assert float(moved.norm()) == pytest.approx(0.5 / math.sqrt(t + 1), rel=1e-5)
        assert float(torch.nn.functional.cosine_similarity(moved, direction, dim=0)) == pytest.approx(1, abs=1e-6)


def test_module_loss_at_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    x, y = torch.randn(16, 4, generator=gen(1)), torch.randint(0, 3, (16,), generator=gen(2))
    loss_at = module_loss_at(model, (x,), lambda out: torch.nn.functional.cross_entropy(out, y))
    stats = {name: b.clone() for name, b in model.named_buffers()}
    shifted = [p.detach() + 0.1 for p in model.parameters()]
    value = loss_at(shifted)
    assert all(torch.equal(b, stats[name]) for name, b in model.named_buffers())
    with torch.no_grad():
        for p, s in zip(model.parameters(), shifted, strict=True):
            p.copy_(s)
        assert float(value) == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), y)), rel=1e-6)


def test_optimizer_errors_say_what_to_change():
    with pytest.raises(ValueError, match="--lr or --lr-table"):
        make_optimizer("sgd", [torch.zeros(2)])
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", [torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("normalized", [torch.zeros(2)], -1.0)
    with pytest.raises(ValueError, match="step\\(loss_at\\)"):
        ArmijoLineSearch([torch.zeros(2)]).step()


@pytest.mark.parametrize("optimizer", ["line-search", "normalized", "adam"])
def test_train_with_each_strategy_resumes_exactly(tmp_path, optimizer):
    """Two epochs straight equal one epoch plus a resumed one (the strategy's state is checkpointed)."""
    from frog.training.train import TrainConfig

    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="frog", num_tangents=4, engine="sim",
                         epochs=2, optimizer=optimizer, seed=1)
    # killed after epoch 1 (its row and checkpoint written), then resumed: rows, model and optimizer state agree
    straight, _ = assert_resume_is_identical(config, tmp_path, stop="on_epoch")
    passes = float(straight[-1]["extra_forward_passes_per_step"])
    assert passes >= 2 if optimizer == "line-search" else passes == 0
    assert float(straight[-1]["val_loss"]) < float(straight[0]["train_loss"]) + 1.0


def test_optimize_cli_records_the_strategy_and_its_passes(tmp_path):
    from frog.cli import main
    from frog.training.results import read_csv

    assert main(["optimize", "--function", "sphere", "--dims", "16", "-k", "4", "--methods", "fg-mean", "frog",
                 "--seeds", "0", "--steps", "50", "--optimizer", "line-search", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "optimization.csv")[1]
    assert {r["optimizer"] for r in rows} == {"line-search"}
    assert all(float(r["extra_forward_passes_per_step"]) >= 2 and float(r["best_value"]) < 16 for r in rows)
    assert float(rows[0]["lr"]) == 1.0  # the line search's default first trial step
