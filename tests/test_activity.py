"""Automatic blocks for activity perturbation: models that are not an nn.Sequential.

The independent check: with k = n basis tangents over the block outputs, the projection of every
per-sample activity gradient is exact, so the weight estimates must equal autograd's gradient of the
mean loss, whatever the model does between its blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frog

F64 = torch.float64
VOCAB, CONTEXT, DIM = 5, 4, 4  # the context differs from the batch size (3): see shared_by_batch


class Layer(nn.Module):
    """Causal attention + MLP, called with an extra positional mask and a keyword; returns a tuple."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask, *, gain=1.0):
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + gain * F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + torch.tanh(self.mlp(x)), mask


class TinyLM(nn.Module):
    """Token + position embeddings (the position's output (T, C) has no batch dimension), a list of
    layers, an output layer tied to the token embedding; returns (logits, mean loss or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Embedding(VOCAB, DIM)
        self.position = nn.Embedding(CONTEXT, DIM)
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.ModuleList(Layer(DIM) for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.token.weight

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.dropout(self.token(idx) + self.position(torch.arange(t)))
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        for layer in self.layers:
            x, mask = layer(x, mask, gain=0.5)
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class Output(dict):
    """A dict-like output whose first value is the hidden state, like Hugging Face's ModelOutput."""


class MappingLayer(Layer):
    def forward(self, x, mask, *, gain=1.0):
        hidden, mask = super().forward(x, mask, gain=gain)
        return Output(hidden_states=hidden, mask=mask)


class MappingLM(TinyLM):
    """TinyLM written as Hugging Face models are: a position embedding of shape (1, T, C) (broadcast over
    the batch) and layers returning a mapping whose first value is the hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MappingLayer(DIM) for _ in range(2))

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.token(idx) + self.position(torch.arange(t).unsqueeze(0))  # (B, T, C) + (1, T, C)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        for layer in self.layers:
            out = layer(x, mask, gain=0.5)
            x, mask = out["hidden_states"], out["mask"]
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def data(batch=3):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (batch, CONTEXT), generator=g), torch.randint(0, VOCAB, (batch, CONTEXT), generator=g)


def token_losses(idx, targets):
    """Per-token losses (B, T); frog averages them per sequence."""
    return lambda m: F.cross_entropy(m(idx)[0].transpose(1, 2), targets, reduction="none")


def exact_gradients(model, loss):
    model = copy.deepcopy(model)
    loss(model).backward()
    return [p.grad for p in model.parameters()]


def activity_size(model, idx):
    """n: the entries of all block outputs of one sample (shared outputs counted once)."""
    sizes = []

    def record(module, args, output):
        h = frog.activity.first_tensor(output)
        sizes.append(h.numel() if frog.activity.shared_by_batch(h, idx.shape[0]) else h[0].numel())

    hooks = [b.register_forward_hook(record) for b in frog.activity.blocks_of(model)]
    model(idx)
    for h in hooks:
        h.remove()
    return sum(sizes)


def test_describe_blocks_of_a_language_model():
    text = frog.describe_blocks(TinyLM())
    lines = text.splitlines()
    assert lines[0].startswith("5 blocks of TinyLM")
    assert [line.split(":")[1].split("(")[0].strip() for line in lines[1:]] == \
        ["token", "position", "layers.0", "layers.1", "head"]
    assert "shares token.weight with block 4" in lines[1] and "shares token.weight with block 0" in lines[5]
    assert "(Embedding, 20 parameters)" in lines[1]


@pytest.mark.parametrize("language_model", [TinyLM, MappingLM])
@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_k_equals_n_basis_tangents_give_the_exact_gradient(engine, language_model):
    """Embeddings of integer inputs, an output without batch dimension ((T, C), or (1, T, C) broadcast
    over the batch), tied weights, a model returning (logits, loss), blocks with extra arguments
    returning tuples or mappings, per-token losses."""
    torch.manual_seed(0)
    model = language_model().double()
    idx, targets = data()
    n = 3 * CONTEXT * DIM + CONTEXT * DIM + CONTEXT * VOCAB  # token, 2 layers, head: (T, C) per sample; position: (T, C) shared
    assert activity_size(model, idx) == n
    fg = frog.ForwardGradient(n, sampler="basis", engine=engine, perturbation="activity", seed=1)
    estimate = copy.deepcopy(model)
    loss = fg.fill_grad(estimate, token_losses(idx, targets))
    exact = exact_gradients(model, lambda m: m(idx, targets)[1])
    torch.testing.assert_close(loss, model(idx, targets)[1].detach(), rtol=1e-12, atol=0)
    tol = 1e-6 if engine == "fd" else 1e-10
    for got, want in zip((p.grad for p in estimate.parameters()), exact, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_forward_engines_equal_sim_with_few_tangents():
    torch.manual_seed(1)
    model = TinyLM().double()
    idx, targets = data()
    grads = {}
    for engine in ("jvp", "loop", "sim"):
        m = copy.deepcopy(model)
        frog.ForwardGradient(5, engine=engine, perturbation="activity", seed=2).fill_grad(m, token_losses(idx, targets))
        grads[engine] = [p.grad for p in m.parameters()]
    for engine in ("jvp", "loop"):
        for got, want in zip(grads[engine], grads["sim"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_sequential_with_parameter_free_children():
    """Children without parameters (activations, pooling) are glue between blocks, not blocks."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
    assert frog.activity.blocks_of(model) == [model[0], model[4]]
    x, y = torch.randn(4, 1, 6, 6, dtype=F64), torch.tensor([0, 1, 2, 1])
    n = 2 * 4 * 4 + 3
    for engine in ("jvp", "sim"):
        estimate = copy.deepcopy(model)
        frog.ForwardGradient(n, sampler="basis", engine=engine, perturbation="activity").fill_grad(
            estimate, lambda m: F.cross_entropy(m(x), y, reduction="none"))
        exact = exact_gradients(model, lambda m: F.cross_entropy(m(x), y))
        for got, want in zip((p.grad for p in estimate.parameters()), exact, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stacks_in_sequential_children_are_opened():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 4)
            self.stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # two of one class: opened
            self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # mixed: one block

        def forward(self, x):
            return self.head(self.stack(self.stem(x)))

    net = Net()
    assert frog.activity.blocks_of(net) == [net.stem, net.stack[0], net.stack[1], net.head]


def test_transformer_encoder_layers_are_blocks():
    """nn.TransformerEncoder holds its layers in a ModuleList: each layer is a block, and the
    estimate with k = n basis tangents is the exact gradient."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 4)
            layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.encoder(self.embed(x)).mean(1))

    torch.manual_seed(3)
    model = Encoder().double()
    assert frog.activity.blocks_of(model) == [model.embed, *model.encoder.layers, model.out]
    x, y = torch.randn(3, 5, 3, dtype=F64), torch.tensor([0, 1, 1])
    estimate = copy.deepcopy(model)
    n = 3 * 5 * 4 + 2
    frog.ForwardGradient(n, sampler="basis", perturbation="activity").fill_grad(
        estimate, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    exact = exact_gradients(model, lambda m: F.cross_entropy(m(x), y))
    for got, want in zip((p.grad for p in estimate.parameters()), exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(self.layer(x))


class CellLoop(nn.Module):
    """An LSTMCell stepped through a sequence (pytorch/examples' time_sequence_prediction): the second
    call's input (the cell state) comes from the first, so the repeated call is what to report."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(1, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t:t + 1], state)
        return self.head(state[0])


class NoGradBackbone(nn.Module):
    """A backbone run under torch.no_grad() with trainable parameters (a fine-tuning script that forgot to
    freeze it): its output has no autograd graph."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone(x)
        return self.head(h)


class Labels(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(x).argmax(-1)


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x * self.scale)


class LabelBlock(nn.Module):
    """A block whose output carries no tangent (integers)."""

    def __init__(self):
        super().__init__()
        self.inner = Labels()

    def forward(self, x):
        return F.one_hot(self.inner(x), 3).double()


@pytest.mark.parametrize("model,message", [
    (Twice(), r"block 'layer' ran twice"),
    (CellLoop(), r"block 'cell' ran twice"),
    (NoGradBackbone(), r"block 'backbone' returned an output without autograd graph .* freeze them"),
    (Unused(), r"block 'spare' did not run"),
    (OwnParameter(), r"parameters scale belong to the model itself"),
    (LabelBlock(), r"block 'inner' must return a floating-point tensor"),
    (nn.Linear(3, 2), r"cannot find blocks .* in Linear: its parameters weight, bias"),
])
def test_one_clear_error_that_names_the_module(model, message):
    x = torch.randn(4, 3)
    fg = frog.ForwardGradient(2, perturbation="activity")
    with pytest.raises(ValueError, match=message):
        fg.fill_grad(model, lambda m: m(x).double().sum(-1))


def test_nested_blocks_are_refused():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3)), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="contains block"):
        frog.activity.blocks_of(model, [model[0], model[0][0], model[1]])


def test_scalar_loss_is_refused_with_the_fix():
    model = TinyLM()
    idx, targets = data()
    with pytest.raises(ValueError, match=r"per-sample losses .* not the batch's mean"):
        frog.ForwardGradient(2, perturbation="activity").fill_grad(model, lambda m: m(idx, targets)[1])


class FunctionalTying(nn.Module):
    """The output layer uses the embedding's weight directly, not through a module."""

    def __init__(self):
        super().__init__()
        self.token = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, idx):
        return self.mix(self.token(idx)) @ self.token.weight.T


class GlueParameter(nn.Module):
    """A block's weight also scales the next block's input, outside both blocks."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.second(self.first(x) * self.first.bias)


@pytest.mark.parametrize("model,message", [
    (FunctionalTying(), r"parameter 'token.weight' is used outside its block \(after the last block\)"),
    (GlueParameter(), r"parameter 'first.bias' is used outside its block \(in the input of block 'second'\)"),
])
def test_parameters_used_outside_their_blocks_are_refused(model, message):
    idx = data()[0] if isinstance(model, FunctionalTying) else torch.randn(3, 3)
    with pytest.raises(ValueError, match=message):
        frog.ForwardGradient(2, perturbation="activity").fill_grad(model, lambda m: m(idx).square().flatten(1).sum(1))
