"""Gradient approaches by name (frog.training.methods): the estimator of each, checked by what it computes."""

from __future__ import annotations

import pytest
import torch
from conftest import autograd_grad, gen

from frog.estimator import ForwardGradient
from frog.guesses import LocalHeads
from frog.local import LocalLearning
from frog.mezo import MeZO
from frog.training.functions import rosenbrock
from frog.training.methods import AGGREGATION_OF, METHOD_NAMES, PAPER_METHODS, check_method_name, estimator_for

F64 = torch.float64


def test_names():
    assert PAPER_METHODS == ("bp", "fg-mean", "fg-sum", "frog")
    assert METHOD_NAMES == (*PAPER_METHODS, "mezo", "local")
    for name in METHOD_NAMES:
        check_method_name(name)
    with pytest.raises(ValueError) as caught:
        check_method_name("adam")
    assert str(caught.value) == "unknown method 'adam'; choose one of bp, fg-mean, fg-sum, frog, mezo, local"


def test_bp_has_no_estimator():
    assert estimator_for("bp", 4) is None
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        estimator_for("sgd", 4)


@pytest.mark.parametrize("method", ["fg-mean", "fg-sum", "frog"])
def test_forward_gradients_get_their_aggregation_k_and_options(method):
    fg = estimator_for(method, 3, engine="sim", seed=5, mezo_eps=0.5)  # mezo_eps is MeZO's only
    assert isinstance(fg, ForwardGradient)
    assert (fg.num_tangents, fg.aggregation, fg.engine.name, fg.seed) == (3, AGGREGATION_OF[method], "sim", 5)


def test_frog_with_k_equal_n_is_the_exact_gradient():
    x = torch.randn(5, generator=gen(0), dtype=F64)
    estimate = estimator_for("frog", 5, seed=1).grad(rosenbrock, x)
    torch.testing.assert_close(estimate, autograd_grad(rosenbrock, x))


def test_mean_is_the_sum_over_k_on_the_same_tangents():
    x = torch.randn(6, generator=gen(1), dtype=F64)
    options = {"seed": 2, "scale_correction": False}
    total = estimator_for("fg-sum", 3, **options).grad(rosenbrock, x)
    mean = estimator_for("fg-mean", 3, **options).grad(rosenbrock, x)
    torch.testing.assert_close(mean, total / 3)
    assert not torch.allclose(total, autograd_grad(rosenbrock, x))  # k < n: an estimate, not the gradient


def test_mezo_takes_k_directions_the_seed_and_mezo_eps():
    mezo = estimator_for("mezo", 4, seed=7, mezo_eps=0.01, engine="jvp")
    assert isinstance(mezo, MeZO)
    assert (mezo.directions, mezo.seed, mezo.eps) == (4, 7, 0.01)
    assert estimator_for("mezo", 1).eps == 1e-3  # MeZO's default


def test_local_takes_the_guess_and_blocks():
    heads = LocalHeads(3)
    blocks = [torch.nn.Linear(2, 2)]
    local = estimator_for("local", 1, guess=heads, blocks=blocks)
    assert isinstance(local, LocalLearning)
    assert local.guess is heads and local.blocks is blocks
