"""Plain kernels for fused ones without forward-mode rules (frog.plain_kernels): their values against
PyTorch's, and the forward-mode engines against sim on models with nn.LSTM (float32: oneDNN's kernel),
nn.GRU, nn.EmbeddingBag and weight normalization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import _VF, nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

import frog
from frog.plain_kernels import RECURRENT, embedding_bag, forward_mode_kernels, weight_norm

F64 = torch.float64


def table() -> torch.Tensor:
    return torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag_fixed_length_bags(mode, padding_idx):
    idx = torch.tensor([[1, 2, 3], [2, 2, 9], [0, 5, 5]])
    expected = F.embedding_bag(idx, table(), mode=mode, padding_idx=padding_idx)
    torch.testing.assert_close(embedding_bag(idx, table(), mode=mode, padding_idx=padding_idx), expected)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_with_offsets_and_an_empty_bag(mode, include_last_offset):
    idx = torch.tensor([1, 2, 3, 2, 9, 0, 5])
    offsets = torch.tensor([0, 3, 3, 5] + ([7] if include_last_offset else []))  # bag 1 is empty; CSR end
    kwargs = {"mode": mode, "include_last_offset": include_last_offset, "padding_idx": 9}
    expected = F.embedding_bag(idx, table(), offsets, **kwargs)
    torch.testing.assert_close(embedding_bag(idx, table(), offsets, **kwargs), expected)


def test_embedding_bag_per_sample_weights():
    idx, offsets = torch.tensor([1, 2, 3, 2, 9]), torch.tensor([0, 2])
    weights = torch.rand(5, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = F.embedding_bag(idx, table(), offsets, mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(embedding_bag(idx, table(), offsets, mode="sum", per_sample_weights=weights), expected)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weight_norm_formula(dim):
    v = torch.randn(5, 3, dtype=F64)
    g = torch.norm_except_dim(torch.randn(5, 3, dtype=F64), 2, dim)
    torch.testing.assert_close(weight_norm(v, g, dim), torch._weight_norm(v, g, dim))


def test_context_restores_everything():
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    before = torch._weight_norm, F.embedding_bag
    with pytest.raises(RuntimeError, match="inside"), forward_mode_kernels():
        with forward_mode_kernels():  # nested
            assert F.embedding_bag is embedding_bag
        assert torch._weight_norm is weight_norm and all(name in vars(_VF) for name in RECURRENT)
        raise RuntimeError("inside")
    assert (torch._weight_norm, F.embedding_bag) == before and not any(name in vars(_VF) for name in RECURRENT)
    assert (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled) == (mkldnn, cudnn)


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](6, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, idx):
        return self.head(self.rnn(self.embed(idx))[0][:, -1])


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 6, mode="mean", padding_idx=0)
        self.head = parametrizations.weight_norm(nn.Linear(6, 3))

    def forward(self, idx):
        return self.head(torch.tanh(self.bag(idx)))


MODELS = {"lstm": (lambda: Recurrent("lstm"), torch.float32), "gru": (lambda: Recurrent("gru"), F64),
          "embedding bag + weight norm": (Bag, F64)}


@pytest.mark.parametrize("perturbation", ["weight", "activity"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_mode_engines_equal_sim(name, perturbation):
    build, dtype = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    idx, y = torch.randint(0, 12, (5, 7)), torch.arange(5) % 3
    reduction = "none" if perturbation == "activity" else "mean"
    estimates = {}
    for engine in ("sim", "jvp", "loop"):
        m = copy.deepcopy(model)
        frog.ForwardGradient(4, engine=engine, seed=1, perturbation=perturbation).fill_grad(
            m, lambda m: F.cross_entropy(m(idx), y, reduction=reduction))
        estimates[engine] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for engine in ("jvp", "loop"):
        assert float((estimates[engine] - estimates["sim"]).norm() / estimates["sim"].norm()) < tol, engine
