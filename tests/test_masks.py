"""The same dropout masks in every pass of a step, whatever the engine and the tensors' memory layout:
frog.forward_mode.masks.dropout against PyTorch's, and the engines against each other on a TransformerEncoder with
dropout in its layers and its attention (weight and activity perturbation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import frog
from frog.forward_mode.masks import dropout, same_masks

F64 = torch.float64


def test_dropout_equals_pytorchs_for_contiguous_inputs():
    x = torch.randn(6, 7, 5, dtype=F64)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, True), expected)
    assert torch.equal(dropout(x, 0.3, False), x)  # eval mode: the input itself
    assert torch.equal(dropout(x, 0.0, True), x)


def test_dropout_mask_follows_the_shape_not_the_memory_layout():
    x = torch.randn(6, 7, dtype=F64)
    transposed_layout = x.t().contiguous().t()  # the same values, column-major
    assert torch.equal(x, transposed_layout) and transposed_layout.stride() != x.stride()

    def seeded(fn, t):
        torch.manual_seed(3)
        return fn(t, 0.4, True)

    assert torch.equal(seeded(dropout, x), seeded(dropout, transposed_layout))
    # PyTorch's mask follows the memory order: why frog has its own
    assert not torch.equal(seeded(F.dropout, x), seeded(F.dropout, transposed_layout))


def test_dropout_in_place_and_scaling():
    x = torch.ones(1000, dtype=F64)
    torch.manual_seed(0)
    out = dropout(x, 0.25, True, inplace=True)
    assert out is x
    assert set(out.unique().tolist()) <= {0.0, 1 / 0.75}
    assert 0.15 < float((out == 0).double().mean()) < 0.35


def test_same_masks_routes_and_restores():
    before = F.dropout, F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="inside"), same_masks():
        assert F.dropout is dropout
        raise RuntimeError("inside")
    assert (F.dropout, F.scaled_dot_product_attention) == before


class Encoder(nn.Module):
    """Embedding, a 2-layer TransformerEncoder (dropout after attention and in the MLP, attention dropout)
    and a head: PyTorch's MultiheadAttention hands a transposed output to a Dropout."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=p, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, idx):
        return self.head(self.encoder(self.embed(idx)).flatten(1))


@pytest.mark.parametrize("perturbation", ["weight", "activity"])
def test_engines_agree_on_a_transformer_with_dropout(perturbation):
    torch.manual_seed(0)
    model = Encoder(0.2).double().train()
    idx, y = torch.randint(0, 20, (6, 5)), torch.arange(6) % 3
    reduction = "none" if perturbation == "activity" else "mean"
    estimates = {}
    for engine in ("sim", "jvp", "loop", "fd"):
        m = copy.deepcopy(model)
        fg = frog.ForwardGradient(4, engine=engine, seed=2, perturbation=perturbation, fd_step=1e-6)
        torch.manual_seed(7)  # the step's dropout masks
        fg.fill_grad(m, lambda m: F.cross_entropy(m(idx), y, reduction=reduction))
        estimates[engine] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    reference = estimates["sim"]
    for engine in ("jvp", "loop", "fd"):
        tol = 1e-6 if engine == "fd" else 1e-10
        assert float((estimates[engine] - reference).norm() / reference.norm()) < tol, engine
    # the masks matter: another random state gives another estimate
    m = copy.deepcopy(model)
    torch.manual_seed(8)
    frog.ForwardGradient(4, engine="sim", seed=2, perturbation=perturbation).fill_grad(
        m, lambda m: F.cross_entropy(m(idx), y, reduction=reduction))
    other = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert float((other - reference).norm() / reference.norm()) > 1e-3
