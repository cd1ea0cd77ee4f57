"""Per-example activity tangents, ReLU masks and guesses first (frog.per_example; docs/guides/closing-the-gap.md) against independent
math: least squares per example, autograd, and the rows built by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import frog
from frog.aggregation import coefficients
from frog.guesses import GuessSource, LocalHeads
from frog.layouts import PerExample
from frog.per_example import EXAMPLE_KINDS, MaskCheck, check_example_kind, checked_guesses, example_plan
from frog.tangents import TangentPlan

F64 = torch.float64
ENGINES = ["jvp", "loop", "sim", "fd"]


def relu_mlp() -> nn.Sequential:
    """Blocks of 6 + 4 + 3 = 13 activities per example; the hidden ones end in a ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(5, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 4), nn.ReLU()),
                         nn.Linear(4, 3)).double()


def batch(size: int = 7):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 5, dtype=F64, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def weighted_losses(x, y, weights):
    """Per-sample losses with distinct weights, so that a wrong per-example estimate cannot average out."""
    return lambda m: nn.functional.cross_entropy(m(x), y, reduction="none") * weights


def autograd_grads(model, loss_fn):
    model.zero_grad()
    loss_fn(model).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def filled(model, estimator, loss_fn, targets=None):
    estimator.fill_grad(model, loss_fn, targets=targets)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got, want, tol):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol)


class TrueGradients(GuessSource):
    """Guesses that are the exact per-example activity gradients, computed by autograd on a copy."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn

    def guesses(self, outputs, targets, losses):
        recorded = []
        hooks = [block.register_forward_hook(lambda m, a, o: recorded.append(o)) for block in self.model]
        with torch.enable_grad():
            total = self.loss_fn(self.model).sum()
        for hook in hooks:
            hook.remove()
        return list(torch.autograd.grad(total, recorded))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask", [True, False])
def test_per_example_tangents_with_k_equal_dimension_give_the_exact_gradient(engine, mask):
    """k = 13 independent tangents per example span each example's activities: every example's
    projection is its exact activity gradient, so the weighted per-sample losses' gradient is exact."""
    model, (x, y) = relu_mlp(), batch()
    loss_fn = weighted_losses(x, y, torch.linspace(0.2, 3.0, 7, dtype=F64))
    fg = frog.ForwardGradient(13, engine=engine, seed=2, perturbation="activity", per_example=True, relu_mask=mask,
                              scale_correction=False)
    tol = 1e-5 if engine == "fd" else 1e-10
    assert_grads_close(filled(model, fg, loss_fn), autograd_grads(model, loss_fn), tol)


def test_per_example_estimates_are_per_example_projections():
    """k < n: each example's output-gradient estimate is the projection of its own gradient onto its own
    tangents (least squares per example), not onto a shared span."""
    gen = torch.Generator().manual_seed(0)
    B, k, q = 5, 3, 8
    raw = torch.randn(k, B, q, dtype=F64, generator=gen)
    grads = torch.randn(B, q, dtype=F64, generator=gen)
    layout = PerExample(torch.Size([q]), B)
    jvps = layout.inner(raw, grads, B)  # (k, B)
    coeffs = coefficients(layout.gram(raw), jvps, "project")
    estimate = layout.estimate(raw, coeffs).T  # (B, q)
    for i in range(B):
        basis = raw[:, i].T  # (q, k)
        solution = torch.linalg.lstsq(basis, grads[i].unsqueeze(1)).solution
        torch.testing.assert_close(estimate[i], (basis @ solution).squeeze(1))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask", [True, False])
def test_true_guesses_give_the_exact_gradient_at_k_equal_L(engine, mask):
    """With guesses that equal the true activity gradients, k = L = 3 tangents (one per block, no random
    ones) give exactly the gradient."""
    model, (x, y) = relu_mlp(), batch()
    loss_fn = weighted_losses(x, y, torch.linspace(0.5, 2.0, 7, dtype=F64))
    fg = frog.ForwardGradient(3, engine=engine, seed=0, perturbation="activity", relu_mask=mask,
                              guess=TrueGradients(model, loss_fn))
    tol = 1e-5 if engine == "fd" else 1e-10
    assert_grads_close(filled(model, fg, loss_fn), autograd_grads(model, loss_fn), tol)


def test_bad_guesses_and_missing_targets_get_clear_errors():
    model, (x, y) = relu_mlp(), batch()
    loss_fn = weighted_losses(x, y, torch.ones(7, dtype=F64))

    class Wrong(GuessSource):
        def guesses(self, outputs, targets, losses):
            return [torch.zeros(7, 5, dtype=F64), None, None]

    fg = frog.ForwardGradient(4, perturbation="activity", guess=Wrong())
    with pytest.raises(ValueError, match=r"guess for block '0' must have the shape of its output \(7, 6\), got \(7, 5\)"):
        fg.fill_grad(model, loss_fn)

    class Short(GuessSource):
        def guesses(self, outputs, targets, losses):
            return [None]

    with pytest.raises(ValueError, match="one entry per block"):
        frog.ForwardGradient(4, perturbation="activity", guess=Short()).fill_grad(model, loss_fn)
    with pytest.raises(ValueError, match="targets=y"):
        frog.ForwardGradient(4, perturbation="activity", guess=LocalHeads(3)).fill_grad(model, loss_fn)
    with pytest.raises(ValueError, match="at least 3 tangents"):
        frog.ForwardGradient(2, perturbation="activity", guess=LocalHeads(3)).fill_grad(model, loss_fn, targets=y)
    with pytest.raises(ValueError, match="perturbation='activity'"):
        frog.ForwardGradient(4, per_example=True)
    with pytest.raises(ValueError, match="sampler='normal' or 'rademacher'"):
        frog.ForwardGradient(4, "project", "orthonormal", perturbation="activity", per_example=True)
    with pytest.raises(ValueError, match="GuessSource"):
        frog.ForwardGradient(4, perturbation="activity", guess=lambda *a: None)


def test_relu_mask_only_where_zeros_cannot_reach_the_parameters():
    checker = MaskCheck()
    x = torch.randn(6, 4)
    relu_block = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    output = relu_block(x)
    assert bool((output == 0).any())
    torch.testing.assert_close(checker.mask(relu_block, output), (output != 0).float())
    linear = nn.Linear(4, 3)
    with torch.no_grad():  # a unit that is exactly 0 for every input, yet its weights get a gradient
        linear.weight[0].zero_()
        linear.bias[0] = 0.0
    assert checker.mask(linear, linear(x)) is None


def random_rows(count, shapes, seed=5):
    """A plan of ``count`` random rows for blocks of ``shapes`` (what the estimator draws beside the guesses)."""
    return TangentPlan("normal", count, shapes, seed=seed, step=0, dtype=F64)


@pytest.mark.parametrize("per_example", [True, False])
def test_example_plan_puts_normalized_masked_guesses_first_then_masked_random_rows(per_example):
    """Row 0 of block 0 is its guess times its mask, normalized per example, and zero in block 1 (which has
    no guess); rows 1.. are the random rows (one per example, or one shared by the batch), masked."""
    gen = torch.Generator().manual_seed(0)
    B, k, features = 4, 3, [torch.Size([3]), torch.Size([2])]
    outputs = [torch.randn(B, 3, dtype=F64, generator=gen), torch.randn(B, 2, dtype=F64, generator=gen)]
    guess = torch.randn(B, 3, dtype=F64, generator=gen)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=F64)
    random = random_rows(k - 1, [torch.Size([B, *f]) for f in features] if per_example else features)
    plan = example_plan(random, k, features, outputs, [False, False], per_example=per_example, masks=[mask, None],
                        guesses=[[guess], []])
    drawn = [random.block(b) if per_example else random.block(b).unsqueeze(1).expand(k - 1, B, *features[b])
             for b in range(2)]
    expected0 = torch.cat([((guess * mask) / (guess * mask).norm(dim=1, keepdim=True)).unsqueeze(0),
                           drawn[0] * mask])
    expected1 = torch.cat([torch.zeros(1, B, 2, dtype=F64), drawn[1]])
    torch.testing.assert_close(plan.block(0), expected0, rtol=0, atol=1e-15)
    torch.testing.assert_close(plan.block(1), expected1, rtol=0, atol=0)
    rows = torch.cat([expected0, expected1], dim=2)  # (k, B, 5): each example's own k tangents
    torch.testing.assert_close(plan.gram(), torch.einsum("ibf,jbf->bij", rows, rows))


def test_block_local_random_rows_live_in_one_block_each():
    """block_local: random row j is zero outside block j mod L."""
    B, k, features = 2, 5, [torch.Size([3]), torch.Size([4])]
    outputs = [torch.ones(B, 3, dtype=F64), torch.ones(B, 4, dtype=F64)]
    guess = torch.ones(B, 4, dtype=F64)
    random = random_rows(k - 1, [torch.Size([B, *f]) for f in features])
    plan = example_plan(random, k, features, outputs, [False, False], per_example=True, masks=[None, None],
                        guesses=[[], [guess]], block_local=True)
    for j in range(k - 1):  # random row j is row 1 + j of the plan, after the one guess
        owner = j % 2
        assert torch.equal(plan.block(owner)[1 + j], random.block(owner)[j])
        assert not plan.block(1 - owner)[1 + j].any()
    torch.testing.assert_close(plan.block(1)[0], guess / 2)  # |(1, 1, 1, 1)| = 2 per example
    assert not plan.block(0)[0].any()


def test_guesses_fill_the_first_rows_and_too_many_are_an_error():
    """Three guesses (two for block 0) take rows 0, 1, 2 in block order; k = 2 is too few for them."""
    B, features = 3, [torch.Size([2]), torch.Size([2])]
    outputs = [torch.ones(B, 2, dtype=F64), torch.ones(B, 2, dtype=F64)]
    a, b, c = (torch.full((B, 2), v, dtype=F64) for v in (1.0, -2.0, 3.0))
    guesses = [[a, b], [c]]
    plan = example_plan(None, 3, features, outputs, [False, False], per_example=True, masks=[None, None],
                        guesses=guesses)
    unit = 1 / math.sqrt(2)
    torch.testing.assert_close(plan.block(0), torch.stack([torch.full((B, 2), unit), torch.full((B, 2), -unit),
                                                            torch.zeros(B, 2)]).double())
    torch.testing.assert_close(plan.block(1), torch.stack([torch.zeros(B, 2), torch.zeros(B, 2),
                                                            torch.full((B, 2), unit)]).double())
    with pytest.raises(ValueError, match="gives 3 guesses, one tangent each, but k = 2: use at least 3 tangents"):
        example_plan(None, 2, features, outputs, [False, False], per_example=True, masks=[None, None],
                     guesses=guesses)


def test_shared_outputs_keep_dense_rows_and_take_no_guess():
    """An output without batch dimension (a position embedding) keeps one row shared by the batch."""
    B, features = 3, [torch.Size([2]), torch.Size([4])]
    outputs = [torch.ones(B, 2, dtype=F64), torch.ones(4, dtype=F64)]
    random = random_rows(2, features)
    plan = example_plan(random, 2, features, outputs, [False, True], per_example=False, masks=[None, None],
                        guesses=[[], []])
    assert plan.block(1).shape == (2, 4) and torch.equal(plan.block(1), random.block(1))
    assert plan.block(0).shape == (2, B, 2) and torch.equal(plan.block(0), random.block(0).unsqueeze(1).expand(2, B, 2))
    with pytest.raises(ValueError, match=r"block 'pos' has an output shared by the batch \(4,\)"):
        checked_guesses([None, torch.ones(4)], outputs, [False, True], ["block '0'", "block 'pos'"])


def test_checked_guesses_accept_none_one_or_several_per_block():
    outputs = [torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 5)]
    one, two, three = torch.ones(2, 4), torch.ones(2, 5), 2 * torch.ones(2, 5)
    checked = checked_guesses([None, one, (two, three)], outputs, [False] * 3, ["a", "b", "c"])
    assert [len(given) for given in checked] == [0, 1, 2]
    assert checked[1][0] is one and checked[2][0] is two and checked[2][1] is three
    with pytest.raises(ValueError, match=r"the guess for c must have the shape of its output \(2, 5\), got list"):
        checked_guesses([None, None, [[1.0]]], outputs, [False] * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"one entry per block \(3\), got 2"):
        checked_guesses([None, None], outputs, [False] * 3, ["a", "b", "c"])


def test_per_example_rows_need_an_iid_sampler():
    for kind in EXAMPLE_KINDS:
        check_example_kind(kind, False)
    with pytest.raises(ValueError, match="not 'orthonormal'"):
        check_example_kind("orthonormal", False)
    with pytest.raises(ValueError, match="not 'normal' with normalize"):
        check_example_kind("normal", True)
