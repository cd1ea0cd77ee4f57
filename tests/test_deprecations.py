"""Old public names keep working, each with a DeprecationWarning that names its replacement."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import nn

import frog
from frog.engines import FiniteDifferenceEngine, JvpEngine


def test_tangents_keyword_is_the_sampler():
    x = torch.randn(6, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="it is now sampler="):
        old = frog.ForwardGradient(3, tangents="rademacher", seed=2)
    new = frog.ForwardGradient(3, sampler="rademacher", seed=2)
    assert torch.equal(old.grad(frog.sphere, x), new.grad(frog.sphere, x))
    with pytest.raises(ValueError, match="give sampler= only"):
        frog.ForwardGradient(3, sampler="rademacher", tangents="normal")


def test_engine_options_moved_into_the_engines():
    with pytest.warns(DeprecationWarning, match=r"engine=FiniteDifferenceEngine\(step\)"):
        fg = frog.ForwardGradient(2, engine="fd", fd_step=1e-4)
    assert isinstance(fg.engine, FiniteDifferenceEngine) and fg.engine.step == 1e-4
    with pytest.warns(DeprecationWarning, match=r"engine=JvpEngine\(max_streams\)"):
        fg = frog.ForwardGradient(2, max_streams=3)
    assert isinstance(fg.engine, JvpEngine) and fg.engine.max_streams == 3
    assert frog.ForwardGradient(2, engine=JvpEngine(max_streams=3)).engine.max_streams == 3


def test_step_counter_is_calls():
    fg, mezo = frog.ForwardGradient(2), frog.MeZO()
    fg.grad(frog.sphere, torch.ones(3))
    mezo.fill_grad(nn.Linear(2, 1), lambda m: m(torch.ones(2)).sum())
    with pytest.warns(DeprecationWarning, match="now named calls"):
        assert fg.step == fg.calls == 1
    with pytest.warns(DeprecationWarning, match="now named calls"):
        assert mezo.step == mezo.calls == 1
    resumed = frog.ForwardGradient(2)
    resumed.load_state_dict({"seed": 0, "step": 5})  # a checkpoint of frog 0.1.0
    assert resumed.calls == 5 and resumed.state_dict() == {"seed": 0, "calls": 5}


def test_coefficients_method_is_the_aggregator():
    fg = frog.ForwardGradient(3, scale_correction=False)
    x = torch.ones(4, dtype=torch.float64)
    plan = fg.plan([x.shape], x)
    jvps = torch.arange(3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="fg.aggregator"):
        old = fg.coefficients(plan, jvps)
    assert torch.equal(old, fg.aggregator(plan, jvps))


@pytest.mark.parametrize(("old", "new"), [("frog.layers", "frog.factored"), ("frog.example_tangents", "frog.per_example")])
def test_renamed_modules(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"import {new}"):
        module = importlib.import_module(old)
    replacement = importlib.import_module(new)
    assert all(getattr(module, name) is getattr(replacement, name) for name in dir(replacement)
               if not name.startswith("_") and callable(getattr(replacement, name)))
