"""Training at inference memory: the in-place update without a gradient buffer (ForwardGradient.update)
and the jvp engine's stream cap, against fill_grad. (MeZO, the zeroth-order baseline: test_mezo.py.)"""

from __future__ import annotations

import pytest
import torch
from test_mezo import batch, flat, loss_of, small_model
from torch import nn

import frog


@pytest.mark.parametrize(("engine", "tangents", "perturbation"), [
    ("jvp", "lowrank", "weight"), ("loop", "lowrank", "weight"), ("jvp", "normal", "weight"),
    ("loop", "normal", "weight"), ("loop", "normal", "activity"),
])
def test_update_equals_fill_grad_and_sgd(engine, tangents, perturbation):
    """The lean step (any engine, tangents regenerated) applies jvp's estimate, block by block, without
    touching p.grad."""
    model_a, model_b = small_model(), small_model()
    x, y = batch()

    def loss_fn(m):
        losses = nn.functional.cross_entropy(m(x), y, reduction="none")
        return losses if perturbation == "activity" else losses.mean()

    options = {"engine": engine, "sampler": tangents, "perturbation": perturbation, "seed": 2}
    lean = frog.ForwardGradient(4, **options, tangent_budget_mb=1e-4)  # tangents regenerated, never all kept
    loss_a = lean.update(model_a, loss_fn, lr=0.05)
    loss_b = frog.ForwardGradient(4, **{**options, "engine": "jvp"}).fill_grad(model_b, loss_fn)
    torch.optim.SGD(model_b.parameters(), lr=0.05).step()
    assert all(p.grad is None for p in model_a.parameters())
    assert loss_a.item() == pytest.approx(loss_b.item())
    torch.testing.assert_close(flat(model_a.parameters()), flat(model_b.parameters()), rtol=1e-10, atol=1e-12)
    assert lean.step == 1


def test_capped_streams_give_the_same_jvps():
    model = small_model()
    x, y = batch()
    estimates = []
    for streams in (None, 3, 1):
        fg = frog.ForwardGradient(8, sampler="lowrank", perturbation="weight", seed=1, max_streams=streams)
        fg.fill_grad(model, loss_of(x, y))
        estimates.append(flat(p.grad for p in model.parameters()))
    torch.testing.assert_close(estimates[1], estimates[0])
    torch.testing.assert_close(estimates[2], estimates[0])


def test_clear_errors():
    model = small_model()
    x, y = batch()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        frog.ForwardGradient(2).update(model, loss_of(x, y), lr=0)
    with pytest.raises(ValueError, match="max_streams bounds the vectorized passes of engine='jvp'"):
        frog.ForwardGradient(2, engine="loop", max_streams=1)
    with pytest.raises(ValueError, match="max_streams must be an integer >= 1"):
        frog.ForwardGradient(2, max_streams=0)
