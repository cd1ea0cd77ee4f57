"""Every common torch.optim optimizer learns with frog at default settings and its usual hyperparameters.

frog's estimate has the gradient's expected length by default (the length correction); with the
plain projection (about sqrt(k/n) of the gradient's length) SGD's steps and Adadelta's updates shrink
to almost nothing, so this test fails for them without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frog
from frog.training.data import DEFAULT_DIRS, load_dataset

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
}
STEPS = 50


@pytest.fixture(scope="module")
def images():
    if not Path(DEFAULT_DIRS["fashion-mnist"]).is_dir():
        pytest.skip("needs Fashion-MNIST (Debian package dataset-fashion-mnist)")
    train = load_dataset("fashion-mnist").train
    return train.x[:2048], train.y[:2048]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_lowers_the_training_loss(name, images):
    x_all, y_all = images
    model = small_cnn()  # 9,418 weights: the plain projection has sqrt(16 / 9418) = 4% of the gradient's length
    optimizer = OPTIMIZERS[name](model.parameters())
    fg = frog.ForwardGradient(16)  # frog, k = 16, every other setting at its default
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = F.cross_entropy(model(x_all), y_all).item()
    for _ in range(STEPS):
        idx = torch.randint(0, len(y_all), (64,), generator=generator)
        x, y = x_all[idx], y_all[idx]
        optimizer.zero_grad()
        fg.fill_grad(model, lambda m, x=x, y=y: F.cross_entropy(m(x), y))
        optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x_all), y_all).item()
    assert after < 0.97 * before, f"{name}: training loss {before:.4f} -> {after:.4f} in {STEPS} steps"


def test_default_estimate_has_the_gradients_expected_length():
    """Independent check: on a quadratic with n = 400, the mean of |estimate| / |gradient| over
    many draws is 1 with the default, sqrt(k / n) (about) with the plain projection."""
    n, k = 400, 16
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def fn(z):
        return 0.5 * (a @ z).square().sum()

    g = a.T @ (a @ x)
    for correction, expected in ((True, 1.0), (False, (k / n) ** 0.5)):
        fg = frog.ForwardGradient(k, seed=2, scale_correction=correction)
        ratios = torch.tensor([float(fg.grad(fn, x).norm() / g.norm()) for _ in range(100)])
        assert abs(ratios.mean().item() / expected - 1) < 0.05  # one draw: relative sd 1 / sqrt(2k) = 0.18


def test_same_tangents_holds_the_tangents_for_one_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))

    def estimate(fg):
        fg.fill_grad(model, lambda m: F.cross_entropy(m(x), y))
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    fg = frog.ForwardGradient(4, seed=1)
    with fg.same_tangents():
        first, second = estimate(fg), estimate(fg)
        with pytest.raises(RuntimeError, match="already active"), fg.same_tangents():
            pass
    assert torch.equal(first, second) and fg.step == 1
    assert not torch.equal(estimate(fg), first) and fg.step == 2  # the counter moved on by one
    assert torch.equal(estimate(frog.ForwardGradient(4, seed=1)), first)  # the tangents of call 0


def test_lbfgs_with_held_tangents_and_a_line_search_lowers_the_loss():
    """torch.optim.LBFGS evaluates its closure several times a step. With the tangents held for the step
    and a strong-Wolfe line search, it lowers the training loss."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        initial = float(F.cross_entropy(model(x), y))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")
    fg = frog.ForwardGradient(16, scale_correction=False)
    for _ in range(10):
        with fg.same_tangents():
            optimizer.step(lambda: fg.fill_grad(model, lambda m: F.cross_entropy(m(x), y)))
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.9 * initial


def test_gradient_accumulation_with_held_tangents_equals_the_full_batch_estimate():
    """Micro-batches accumulated under same_tangents() give the estimate of the whole batch (the projection
    is linear in the gradient for fixed tangents); new tangents per micro-batch would not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))

    def flat():
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    frog.ForwardGradient(4, seed=2).fill_grad(model, lambda m: F.cross_entropy(m(x), y))
    full = flat()
    fg = frog.ForwardGradient(4, seed=2)
    model.zero_grad()
    with fg.same_tangents():
        for part in (slice(0, 6), slice(6, 12)):
            fg.fill_grad(model, lambda m, part=part: F.cross_entropy(m(x[part]), y[part]) / 2, accumulate=True)
    torch.testing.assert_close(flat(), full, rtol=1e-10, atol=1e-12)
