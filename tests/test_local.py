"""Local learning (frog.LocalLearning) and top-down guesses (frog.TopDown) against hand-written autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from resume import assert_resume_is_identical, without_seconds
from torch import nn

import frog
from frog.activity import stacks_opened
from frog.cli import main
from frog.guesses import LocalHeads, TopDown
from frog.local import LocalLearning
from frog.training import checkpoints
from frog.training.models import make_model
from frog.training.train import TrainConfig, train

F64 = torch.float64


def mlp(depth: int = 3, width: int = 6, seed: int = 0) -> nn.Sequential:
    """depth hidden Linear+ReLU blocks of 5 -> width, then Linear(width, 3)."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(5 if i == 0 else width, width), nn.ReLU()) for i in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(width, 3)).double()


def batch(size: int = 7):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 5, dtype=F64, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def per_sample(x, y):
    return lambda m: F.cross_entropy(m(x), y, reduction="none")


class AfterPassHeads(LocalHeads):
    """The same heads, given to the estimator after the whole pass (no streaming)."""

    streams = False


def greedy_grads(model: nn.Sequential, heads: dict[str, nn.Module], x, y) -> dict[str, torch.Tensor]:
    """The greedy step by hand: block b's gradient is autograd's gradient of its head's mean cross-entropy
    with the block's input detached; the last block's is that of the true mean loss."""
    grads: dict[str, torch.Tensor] = {}
    h = x
    last = len(model) - 1
    for b, block in enumerate(model):
        out = block(h.detach())
        loss = F.cross_entropy(out, y) if b == last else F.cross_entropy(heads[str(b)](out), y)
        params = dict(block.named_parameters())
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            grads[f"{b}.{name}"] = g
        h = out
    return grads


@pytest.mark.parametrize("source", [LocalHeads, AfterPassHeads])
def test_local_learning_is_the_hand_written_greedy_step(source):
    """Two steps (the first builds the heads): the second's gradients equal the greedy step's by autograd,
    with the heads as they were before it, and the heads take one SGD step on their mean local loss."""
    model, (x, y) = mlp(), batch()
    local = LocalLearning(source(3, lr=0.3))
    local.fill_grad(model, per_sample(x, y), targets=y)
    heads = copy.deepcopy(local.guess.heads)
    loss = local.fill_grad(model, per_sample(x, y), targets=y)
    want = greedy_grads(model, heads, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    for key, head in heads.items():
        h = x
        for block in list(model)[: int(key) + 1]:
            h = block(h)
        params = list(head.parameters())
        grads = torch.autograd.grad(F.cross_entropy(head(h.detach()), y), params)
        for before, after, g in zip(params, local.guess.heads[key].parameters(), grads, strict=True):
            torch.testing.assert_close(after, before - 0.3 * g)
    assert local.calls == 2


def test_streaming_holds_one_block_graph_at_a_time():
    """Peak bytes of the tensors autograd saves for backward: streaming local learning (each hidden block
    trained as it returns, its graph dropped) holds far less than the same step after the whole pass,
    and the estimates agree."""
    model, (x, y) = mlp(depth=8, width=64), batch(32)

    class Saved:
        live = peak = 0

        def __init__(self, tensor):
            self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
            Saved.live += self.size
            Saved.peak = max(Saved.peak, Saved.live)

        def __del__(self):
            Saved.live -= self.size

    peaks, grads = [], []
    for source in (LocalHeads(3), AfterPassHeads(3)):
        local = LocalLearning(source)
        local.fill_grad(model, per_sample(x, y), targets=y)  # builds the heads
        Saved.live = Saved.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
            local.fill_grad(model, per_sample(x, y), targets=y)
        peaks.append(Saved.peak)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert peaks[0] < 0.4 * peaks[1], peaks
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_update_is_an_sgd_step_along_the_estimate():
    model, (x, y) = mlp(), batch()
    twin = copy.deepcopy(model)
    a, b = LocalLearning(LocalHeads(3, seed=4)), LocalLearning(LocalHeads(3, seed=4))
    a.fill_grad(model, per_sample(x, y), targets=y)
    expected = {n: p.detach() - 0.1 * p.grad for n, p in model.named_parameters()}
    b.update(twin, per_sample(x, y), 0.1, targets=y)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name])
        assert p.grad is None


def test_top_down_guesses_are_the_gradient_at_the_last_block_input():
    """Every block of the stream's shape gets dL/dh at the last block's input; local learning with them
    trains each block by that gradient (autograd, block by block)."""
    torch.manual_seed(0)
    model = make_model("resmlp", (1, 1, 5), 3, width=6, depth=3).double()
    x, y = batch()
    local = LocalLearning(TopDown())
    local.fill_grad(model, per_sample(x, y), targets=y)
    blocks = list(model)
    h = x
    outputs = []
    for block in blocks[:-1]:
        h = block(h.detach())
        outputs.append(h)
    top = outputs[-1].detach().requires_grad_()
    (stream,) = torch.autograd.grad(F.cross_entropy(blocks[-1](top), y, reduction="sum"), top)
    for b, block in enumerate(blocks[:-1]):
        want = torch.autograd.grad(outputs[b], list(block.parameters()), stream / 7, retain_graph=True)
        for p, g in zip(block.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, g)
    want = torch.autograd.grad(F.cross_entropy(blocks[-1](top), y), list(blocks[-1].parameters()))
    for p, g in zip(blocks[-1].parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_frog_with_top_down_guesses_and_k_equal_L_takes_their_exact_components():
    """k = L = guesses only: block b's output estimate is c_b gamma_b with c_b = <g_b, gamma_b> / |gamma_b|^2
    per example, g_b the true per-example gradient (autograd); for the block under the last, gamma = g."""
    torch.manual_seed(0)
    model = make_model("resmlp", (1, 1, 5), 3, width=6, depth=2).double()
    x, y = batch()
    fg = frog.ForwardGradient(4, engine="sim", perturbation="activity", guess=TopDown(), relu_mask=False)
    fg.fill_grad(model, per_sample(x, y), targets=y)
    estimate = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    block_name, last_hidden = list(model.named_children())[-2]
    for name, p in last_hidden.named_parameters():
        torch.testing.assert_close(estimate[f"{block_name}.{name}"], p.grad)


def test_local_learning_errors_are_clear():
    model, (x, y) = mlp(), batch()
    with pytest.raises(ValueError, match="targets=y"):
        LocalLearning(LocalHeads(3)).fill_grad(model, per_sample(x, y))
    with pytest.raises(ValueError, match="cannot find blocks .* pass blocks="):
        LocalLearning(LocalHeads(3)).fill_grad(nn.Linear(5, 3).double(), per_sample(x, y), targets=y)
    with pytest.raises(ValueError, match="per-sample losses"):
        LocalLearning(LocalHeads(3)).fill_grad(model, lambda m: F.cross_entropy(m(x), y), targets=y)
    with pytest.raises(ValueError, match="guess must be a frog.GuessSource"):
        LocalLearning(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TopDown's fallback"):
        TopDown(TopDown())


def test_shared_outputs_get_no_local_signal_and_a_warning():
    """A block whose output has no batch dimension (a position embedding) takes no head: it is warned of
    once, and its parameters get zero gradients."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.position = nn.Linear(5, 4), nn.Embedding(7, 4)
            self.hidden, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.embed(x) + self.position(torch.arange(3))[:1]  # (3, 4): shared by the batch
            return self.out(torch.relu(self.hidden(h)))

    torch.manual_seed(0)
    net, (x, y) = Net().double(), batch()
    with pytest.warns(UserWarning, match="position.weight get no gradient"):
        LocalLearning(LocalHeads(3)).fill_grad(net, per_sample(x, y), targets=y)
    assert torch.equal(net.position.weight.grad, torch.zeros_like(net.position.weight))
    assert net.hidden.weight.grad.abs().sum() > 0


def test_stacks_opened_makes_every_basic_block_a_block():
    model = make_model("resnet18", (1, 28, 28), 10)
    blocks = stacks_opened(model)
    assert len(blocks) == 10 and type(blocks[1]).__name__ == "BasicBlock" and blocks[0] is model.stem


def _train(tmp_path, name, **changes):
    settings = {"model": "fc", "width": 16, "dataset": "digits", "gradient": "local", "lr": 0.1, "batch_size": 64,
                "epochs": 2, "head_lr": 0.2}
    config = TrainConfig(**{**settings, **changes})
    return train(config, tmp_path / name, progress=False, log=lambda s: None)


def test_local_training_is_reproducible_and_resumes_bit_identically(tmp_path):
    """The same seed gives the same numbers, and a run cut after an epoch continues exactly (model, heads and
    their optimizer, random state)."""
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="local", lr=0.1, batch_size=64, epochs=2,
                         head_lr=0.2)
    straight, _ = assert_resume_is_identical(config, tmp_path)
    assert without_seconds(_train(tmp_path, "again")) == without_seconds(straight)
    heads = checkpoints.load(tmp_path / "straight" / "checkpoint.pt")["estimator"]["guess"]["heads"]
    assert {name.split(".")[0] for name in heads} == {"0", "1"}  # the hidden blocks


def test_cli_local_learning(tmp_path, capsys):
    args = ["train", "--model", "fc", "--width", "32", "--dataset", "digits", "--gradient", "local", "--epochs", "1",
            "--head-channels", "8", "--lr", "0.1", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "b"), "--perturbation", "weight"]) == 2
    assert "--gradient local does not use --perturbation weight" in capsys.readouterr().err
    assert main(["train", "--model", "resmlp", "--depth", "3", "--width", "16", "--dataset", "digits", "--gradient",
                 "local", "--guess", "topdown", "--lr", "0.1", "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    assert main(["train", "--model", "resmlp", "--dataset", "digits", "--gradient", "bp", "--out",
                 str(tmp_path / "d")]) == 2
    assert "give --lr" in capsys.readouterr().err


def test_first_order_top_down_guesses_are_the_expansion_in_the_branch_jacobians():
    """order=1: block b's guess is g_top + sum_{b < j < L} (J_j - I)^T g_top, each J_j the Jacobian of block j
    (torch.autograd.functional.jacobian, per example), and it is closer to the true per-example gradient than
    g_top alone when the branches are small."""
    torch.manual_seed(0)
    model = make_model("resmlp", (1, 1, 5), 3, width=6, depth=4).double()
    with torch.no_grad():
        for block in list(model)[1:-1]:
            block.outer.weight.mul_(0.1)
    x, y = batch()
    blocks = list(model)
    h, inputs, outputs = x, [], []
    for block in blocks:
        inputs.append(h.detach().requires_grad_())
        h = block(inputs[-1])
        outputs.append(h)
    losses = F.cross_entropy(h, y, reduction="none")
    top = inputs[-1]
    (stream,) = torch.autograd.grad(losses.sum(), top, retain_graph=True)
    rows = TopDown(order=1).guesses(outputs, y, losses, inputs=inputs)
    chained, h = [], x
    for block in blocks:
        h = block(h)
        chained.append(h)
    true = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), chained[:-1])
    for b in range(len(blocks) - 1):
        want = stream.clone()
        for j in range(b + 1, len(blocks) - 1):
            for i in range(7):  # per example: the block maps each row alone
                jac = torch.autograd.functional.jacobian(lambda row, j=j: blocks[j](row[None])[0], inputs[j][i].detach())
                want[i] += (jac - torch.eye(6, dtype=F64)).T @ stream[i]
        torch.testing.assert_close(rows[b], want)
        if b < len(blocks) - 2:
            assert (rows[b] - true[b]).norm() < 0.3 * (stream - true[b]).norm()
