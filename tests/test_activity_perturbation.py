"""ActivityPerturbation's options (block-local random tangents, the hybrid local_weight, several guesses per
block) against least squares and autograd, on linear blocks whose weight gradients reveal the output
gradients: for a Linear block h = W x of one example, W.grad = ghat x^T, so ghat = W.grad x / |x|^2."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frog
from frog.guesses import Combined, GuessSource, LocalHeads, SplitGuesses
from frog.per_example import MaskCheck
from frog.tangents import TangentPlan

F64 = torch.float64
SIZES = (5, 4, 6, 3)  # input, block 0, block 1, block 2 (the last)


def linear_chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(SIZES))).double()


def one_example(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, SIZES[0], dtype=F64, generator=generator), torch.tensor([2])


def losses(x, y):
    return lambda m: F.cross_entropy(m(x), y, reduction="none")


def true_output_gradients(model, x, y) -> list[torch.Tensor]:
    """dL/dh_b of every block output (1, features_b), by autograd."""
    outputs, h = [], x
    for block in model:
        h = block(h)
        outputs.append(h)
    return [g[0] for g in torch.autograd.grad(F.cross_entropy(h, y), outputs)]


def estimated_output_gradients(model, x) -> list[torch.Tensor]:
    """ghat_b = W_b.grad h_{b-1} / |h_{b-1}|^2 for the one example."""
    found, h = [], x[0]
    for block in model:
        found.append(block.weight.grad @ h / h.dot(h))
        h = block.weight.detach() @ h
    return found


def projection(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """rows^T argmin_c |rows^T c - g| (least squares)."""
    if rows.shape[0] == 0:
        return torch.zeros_like(g)
    c = torch.linalg.lstsq(rows.T, g.unsqueeze(1), driver="gelsd").solution
    return (rows.T @ c)[:, 0]


def test_block_local_random_tangents_project_each_block_on_its_own_rows():
    """Random row j lives in block j mod L, so the projection decouples: block b's estimate is the
    least-squares projection of its own gradient onto its own rows (drawn as the estimator draws them)."""
    model, (x, y) = linear_chain(), one_example()
    k, seed = 7, 3
    fg = frog.ForwardGradient(k, engine="sim", seed=seed, scale_correction=False, perturbation=frog.ActivityPerturbation(
        block_local=True, relu_mask=False))
    fg.fill_grad(model, losses(x, y))
    shapes = [torch.Size([s]) for s in SIZES[1:]]
    drawn = TangentPlan("normal", k, shapes, seed=seed, step=0, dtype=F64)
    for b, (got, g) in enumerate(zip(estimated_output_gradients(model, x), true_output_gradients(model, x, y),
                                     strict=True)):
        rows = drawn.block(b)[[j for j in range(k) if j % len(shapes) == b]]
        torch.testing.assert_close(got, projection(rows, g))


def test_without_block_local_the_projection_spans_every_block():
    """The same k rows spread over every block give one joint projection (not block by block)."""
    model, (x, y) = linear_chain(), one_example()
    k, seed = 7, 3
    fg = frog.ForwardGradient(k, engine="sim", seed=seed, scale_correction=False, perturbation="activity")
    fg.fill_grad(model, losses(x, y))
    shapes = [torch.Size([s]) for s in SIZES[1:]]
    drawn = TangentPlan("normal", k, shapes, seed=seed, step=0, dtype=F64)
    whole = torch.cat([drawn.block(b) for b in range(len(shapes))], dim=1)
    expected = projection(whole, torch.cat(true_output_gradients(model, x, y))).split(SIZES[1:])
    for got, want in zip(estimated_output_gradients(model, x), expected, strict=True):
        torch.testing.assert_close(got, want)


class Fixed(GuessSource):
    """A fixed random guess per block (the last block too)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def guesses(self, outputs, targets, losses, **kwargs):
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.randn(h.shape, dtype=h.dtype, generator=generator) for h in outputs]


def test_several_guesses_per_block_give_the_projection_onto_their_span():
    """Combined(A, B) and k = 2 L (no random rows): block b's estimate is the projection of its gradient onto
    span(a_b, b_b), per example."""
    model, (x, y) = linear_chain(), one_example()
    a, b_source = Fixed(10), Fixed(11)
    fg = frog.ForwardGradient(6, engine="sim", perturbation="activity", guess=Combined(a, b_source), relu_mask=False)
    fg.fill_grad(model, losses(x, y), targets=y)
    outputs = [torch.zeros(1, s, dtype=F64) for s in SIZES[1:]]
    first, second = a.guesses(outputs, y, None), b_source.guesses(outputs, y, None)
    for block, (got, g) in enumerate(zip(estimated_output_gradients(model, x), true_output_gradients(model, x, y),
                                         strict=True)):
        rows = torch.stack([first[block][0], second[block][0]])
        torch.testing.assert_close(got, projection(rows, g))
    with pytest.raises(ValueError, match="gives 6 guesses, one tangent each, but k = 5"):
        frog.ForwardGradient(5, engine="sim", perturbation="activity", guess=Combined(a, b_source)).fill_grad(
            model, losses(x, y), targets=y)


def test_the_hybrid_adds_local_learning_to_the_hidden_blocks():
    """local_weight alpha: the estimate is frog's (alpha = 0, same tangents and heads) plus alpha times local
    learning's on every hidden block, and frog's alone on the last block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 6), nn.ReLU()),
                          nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 5, dtype=F64, generator=generator), torch.randint(0, 3, (9,), generator=generator)
    grads = []
    for estimator in (
        frog.ForwardGradient(6, engine="sim", seed=4, perturbation=frog.ActivityPerturbation(
            guess=LocalHeads(3, seed=1), local_weight=0.5)),
        frog.ForwardGradient(6, engine="sim", seed=4, perturbation=frog.ActivityPerturbation(guess=LocalHeads(3, seed=1))),
        frog.LocalLearning(LocalHeads(3, seed=1)),
    ):
        estimator.fill_grad(model, losses(x, y), targets=y)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    hybrid, alone, local = grads
    for name in hybrid:
        want = alone[name] if name.startswith("2.") else alone[name] + 0.5 * local[name]
        torch.testing.assert_close(hybrid[name], want)
    with pytest.raises(ValueError, match="local_weight adds the guesses"):
        frog.ActivityPerturbation(local_weight=0.5)
    with pytest.raises(ValueError, match="local_weight must be a finite number >= 0"):
        frog.ActivityPerturbation(guess=LocalHeads(3), local_weight=-1)


def test_mask_decisions_leave_with_their_model():
    """MaskCheck keys its decisions by the block, held weakly: a freed model leaves none behind, so a new
    model whose blocks reuse the old ids decides afresh."""
    check = MaskCheck()
    block = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    out = block(torch.randn(5, 3) * 10)
    assert check.mask(block, out) is not None and len(check.decided) == 1
    del block, out
    gc.collect()
    assert len(check.decided) == 0
    again = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    check.mask(again, again(torch.randn(5, 3) * 10))
    assert list(check.decided.keys()) == [again]


def test_options_reach_the_estimator_from_the_strategy_object():
    strategy = frog.ActivityPerturbation(per_example=True)
    fg = frog.ForwardGradient(4, perturbation=strategy)
    assert fg.strategy is strategy and fg.perturbation == "activity" and fg.loss_contract == "per-sample"
    with pytest.raises(ValueError, match="carries its own options"):
        frog.ForwardGradient(4, perturbation=strategy, per_example=True)


def test_split_guesses_fit_one_coefficient_per_part():
    """SplitGuesses(A, 2) and k = the number of parts (no random rows): block b's estimate is
    sum_p c_p a_{b,p} with c_p = <g_{b,p}, a_{b,p}> / |a_{b,p}|^2 over the two contiguous halves of its features."""
    model, (x, y) = linear_chain(), one_example()
    source = Fixed(10)
    fg = frog.ForwardGradient(6, engine="sim", perturbation="activity", guess=SplitGuesses(source, 2), relu_mask=False)
    fg.fill_grad(model, losses(x, y), targets=y)
    guesses = source.guesses([torch.zeros(1, s, dtype=F64) for s in SIZES[1:]], y, None)
    for block, (got, g) in enumerate(zip(estimated_output_gradients(model, x), true_output_gradients(model, x, y),
                                         strict=True)):
        a, half = guesses[block][0], (SIZES[block + 1] + 1) // 2
        want = torch.cat([projection(a[None, :half], g[:half]), projection(a[None, half:], g[half:])])
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="pieces must be an integer >= 1"):
        SplitGuesses(source, 0)
