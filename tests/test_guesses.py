"""Per-example activity tangents, ReLU masks and guessed tangents (SPEC 5) against independent math."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frog
from frog.aggregation import coefficients
from frog.cli import main
from frog.guesses import GuessSource, LocalHeads, head_for
from frog.layouts import PerExample
from frog.per_example import MaskCheck
from frog.training.train import TrainConfig, train

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


@pytest.mark.parametrize("per_example", [True, False])
def test_engines_agree_with_local_heads(per_example):
    """k = 6 < 13: jvp and loop (true forward mode) give sim's estimate, heads and all."""
    model, (x, y) = relu_mlp(), batch()
    loss_fn = weighted_losses(x, y, torch.ones(7, dtype=F64))
    results = {}
    for engine in ("sim", "jvp", "loop"):
        fg = frog.ForwardGradient(6, engine=engine, seed=4, perturbation="activity", per_example=per_example,
                                  guess=LocalHeads(3, seed=1))
        results[engine] = [filled(model, fg, loss_fn, y) for _ in range(2)]  # the second step uses trained heads
    for engine in ("jvp", "loop"):
        for got, want in zip(results[engine], results["sim"], strict=True):
            assert_grads_close(got, want, 1e-10)
    exact = autograd_grads(model, loss_fn)
    assert any(not torch.allclose(results["sim"][0][n], exact[n]) for n in exact)  # k < n: an estimate


def test_guesses_are_inside_k_and_heads_learn_from_their_local_loss():
    model, (x, y) = relu_mlp(), batch()
    heads = LocalHeads(3, lr=0.5, seed=0)
    fg = frog.ForwardGradient(4, engine="jvp", seed=0, perturbation="activity", guess=heads)
    loss_fn = weighted_losses(x, y, torch.ones(7, dtype=F64))
    fg.fill_grad(model, loss_fn, targets=y)
    assert sorted(heads.heads.keys()) == ["0", "1"]  # hidden blocks only: the last block's guess is exact
    head = heads.heads["0"]
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(head(model[0](x)), y))
    for _ in range(20):
        fg.fill_grad(model, loss_fn, targets=y)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(head(model[0](x)), y)) < before


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


@pytest.mark.parametrize("channels", [0, 5])
@pytest.mark.parametrize(("shape", "targets", "expected"), [
    ((4, 10), (4,), (4, 3)), ((4, 5, 8), (4,), (4, 3)), ((4, 5, 8), (4, 5), (4, 5, 3)), ((4, 6, 7, 7), (4,), (4, 3))])
def test_heads_fit_images_tokens_and_features(shape, targets, expected, channels):
    head = head_for(torch.zeros(shape), torch.zeros(targets, dtype=torch.long), 3, channels)
    assert head(torch.randn(shape)).shape == expected


@pytest.mark.parametrize(("shape", "positions"), [((4, 6, 7, 7), (2, 3)), ((4, 5, 8), (1,))])
def test_hidden_channels_give_guesses_that_vary_over_positions(shape, positions):
    """Pooling + Linear gives every pixel or token the same guess; a layer with a ReLU first does not."""
    output = torch.randn(shape)
    targets = torch.tensor([0, 1, 2, 0])
    for channels, varies in ((0, False), (5, True)):
        heads = LocalHeads(3, seed=0, hidden_channels=channels, exact_output=False)
        (guess,) = heads.guesses([output.clone().requires_grad_()], targets, torch.zeros(4))
        assert guess.shape == output.shape
        spread = (guess - guess.mean(positions, keepdim=True)).abs().max()
        assert (spread > 1e-6) == varies
    with pytest.raises(ValueError, match="hidden_channels must be an integer >= 0"):
        LocalHeads(3, hidden_channels=-1)


def test_first_token_heads_guess_the_class_token_only():
    """tokens="first": the head reads token 0 (LayerNorm, Linear), so the guess is zero on every other token
    and equals autograd's gradient of the head's local loss there."""
    output, targets = torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 0])
    heads = LocalHeads(3, seed=0, tokens="first", exact_output=False)
    heads.guesses([output.clone().requires_grad_()], targets, torch.zeros(4))  # builds and trains the head once
    head = copy.deepcopy(heads.heads["0"])
    (guess,) = heads.guesses([output.clone().requires_grad_()], targets, torch.zeros(4))
    assert torch.all(guess[:, 1:] == 0) and guess[:, 0].abs().min() > 0
    point = output.clone().requires_grad_()
    logits = F.layer_norm(point[:, 0], (8,), head[1].weight, head[1].bias) @ head[2].weight.T + head[2].bias
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), point)
    torch.testing.assert_close(guess, expected)
    with pytest.raises(ValueError, match="tokens must be one of mean, first"):
        LocalHeads(3, tokens="last")


def test_train_with_guesses_resumes_bit_identically(tmp_path):
    """Heads and their SGD state are in the checkpoint: an interrupted run continues exactly."""
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="frog", num_tangents=4, lr=0.1, batch_size=64,
                         epochs=2, guess="local", per_example_tangents=True, head_lr=0.2)
    straight = train(config, tmp_path / "a", progress=False, log=lambda s: None)
    train(TrainConfig(**{**config.__dict__, "epochs": 1}), tmp_path / "b", progress=False, log=lambda s: None)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    saved["config"]["epochs"] = 2
    (tmp_path / "b" / "config.json").write_text(json.dumps(saved))
    resumed = train(config, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(resumed) == drop(straight)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    heads_a, heads_b = a["estimator"]["guess"]["heads"], b["estimator"]["guess"]["heads"]
    assert heads_a.keys() == heads_b.keys() and {name.split(".")[0] for name in heads_a} == {"0", "1"}  # hidden blocks
    for name in heads_a:
        assert torch.equal(heads_a[name], heads_b[name]), name


def test_cli_guess_and_per_example_in_true_forward_mode(tmp_path, capsys):
    args = ["train", "--model", "fc", "--width", "256", "--dataset", "digits", "--gradient", "frog", "-k", "4",
            "--guess", "local", "--per-example-tangents", "--engine", "jvp", "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["guess"] == "local" and config["config"]["per_example_tangents"]
    assert "backprop's" in config["lr_source"]  # frog's guesses.csv has no fc_w=256 digits row
    assert main(["train", "--gradient", "bp", "--guess", "local", "--out", str(tmp_path / "bp")]) == 2
    assert "--gradient bp does not use --guess: drop it" in capsys.readouterr().err
