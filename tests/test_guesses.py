"""Guessed activity tangents (frog.guesses; docs/guides/closing-the-gap.md): local heads, their training and shapes, in frog train.
(Per-example tangents, masks and the guess rows of the plan: test_per_example.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from resume import assert_resume_is_identical
from test_per_example import assert_grads_close, autograd_grads, batch, filled, relu_mlp, weighted_losses
from torch import nn

import frog
from frog.cli import main
from frog.guesses import LocalHeads, head_for
from frog.training import checkpoints
from frog.training.train import TrainConfig

F64 = torch.float64


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
    assert_resume_is_identical(config, tmp_path)  # the model and the estimator's state: heads and their optimizer
    heads = checkpoints.load(tmp_path / "straight" / "checkpoint.pt")["estimator"]["guess"]["heads"]
    assert {name.split(".")[0] for name in heads} == {"0", "1"}  # the hidden blocks have heads


def test_cli_guess_and_per_example_in_true_forward_mode(tmp_path, capsys):
    args = ["train", "--model", "fc", "--width", "256", "--dataset", "digits", "--gradient", "frog", "-k", "4",
            "--guess", "local", "--per-example-tangents", "--engine", "jvp", "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["guess"] == "local" and config["config"]["per_example_tangents"]
    assert "backprop's" in config["lr_source"]  # frog's guesses.csv has no fc_w=256 digits row
    assert main(["train", "--gradient", "bp", "--guess", "local", "--out", str(tmp_path / "bp")]) == 2
    assert "--gradient bp does not use --guess: drop it" in capsys.readouterr().err
