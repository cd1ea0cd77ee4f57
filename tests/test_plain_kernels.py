"""Plain kernels for fused ones without forward-mode rules (frog.forward_mode.plain_kernels): their values against
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
from frog.forward_mode.plain_kernels import (
    RECURRENT,
    ctc_loss,
    embedding,
    embedding_bag,
    forward_mode_kernels,
    weight_norm,
)

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


def ctc_inputs():
    g = torch.Generator().manual_seed(2)
    log_probs = torch.randn(12, 3, 5, dtype=F64, generator=g).log_softmax(-1)  # (T, B, C), 0 the blank
    targets = torch.randint(1, 5, (3, 4), generator=g)
    return log_probs, targets, torch.tensor([12, 10, 11]), torch.tensor([4, 2, 3])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ctc_loss_values_and_jvp(reduction):
    """Values equal F.ctc_loss's; the jvp equals PyTorch's reverse-mode derivative of F.ctc_loss
    contracted with the tangent (for log_probs that are log_softmax outputs, as ctc_loss requires)."""
    log_probs, targets, input_lengths, target_lengths = ctc_inputs()
    ours = lambda x: ctc_loss(x, targets, input_lengths, target_lengths, reduction=reduction)
    theirs = lambda x: F.ctc_loss(x, targets, input_lengths, target_lengths, reduction=reduction)
    torch.testing.assert_close(ours(log_probs), theirs(log_probs), rtol=1e-14, atol=0)
    tangents = torch.randn(4, *log_probs.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    jvps = torch.func.vmap(lambda t: torch.func.jvp(ours, (log_probs,), (t,))[1])(tangents)
    jacobian = torch.func.jacrev(theirs)(log_probs)  # (*loss shape, T, B, C)
    expected = torch.stack([(jacobian * t).flatten(jacobian.dim() - 3).sum(-1) for t in tangents])
    torch.testing.assert_close(jvps, expected, rtol=1e-10, atol=1e-12)
    x = log_probs.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ours(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(theirs(x).sum(), x)[0], rtol=1e-12, atol=1e-14)


def test_ctc_loss_list_lengths_unbatched_and_zero_infinity():
    log_probs, targets, _, _ = ctc_inputs()
    torch.testing.assert_close(ctc_loss(log_probs, targets, [12, 10, 11], [4, 2, 3]),
                               F.ctc_loss(log_probs, targets, [12, 10, 11], [4, 2, 3]))
    torch.testing.assert_close(ctc_loss(log_probs[:, 0], targets[0], [12], [4], reduction="none"),
                               F.ctc_loss(log_probs[:, 0], targets[0], [12], [4], reduction="none"))
    impossible = [1, 10, 11]  # 1 frame for 4 labels: infinite loss
    torch.testing.assert_close(ctc_loss(log_probs, targets, impossible, [4, 2, 3], zero_infinity=True),
                               F.ctc_loss(log_probs, targets, impossible, [4, 2, 3], zero_infinity=True))


def test_context_restores_everything():
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    before = torch._weight_norm, F.embedding, F.embedding_bag, F.ctc_loss
    with pytest.raises(RuntimeError, match="inside"), forward_mode_kernels():
        with forward_mode_kernels():  # nested
            assert F.embedding_bag is embedding_bag
        assert torch._weight_norm is weight_norm and all(name in vars(_VF) for name in RECURRENT)
        raise RuntimeError("inside")
    assert (torch._weight_norm, F.embedding, F.embedding_bag, F.ctc_loss) == before
    assert not any(name in vars(_VF) for name in RECURRENT)
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


class Speech(nn.Module):
    """Frames (B, T, 4) -> Conv1d -> GRU -> per-frame log-probabilities (T, B, C), for a CTC loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, frames):
        h = torch.relu(self.conv(frames.transpose(1, 2))).transpose(1, 2)
        return self.head(self.rnn(h)[0]).log_softmax(-1).transpose(0, 1)


MODELS = {"lstm": (lambda: Recurrent("lstm"), torch.float32), "gru": (lambda: Recurrent("gru"), F64),
          "embedding bag + weight norm": (Bag, F64), "ctc": (Speech, F64)}


@pytest.mark.parametrize("perturbation", ["weight", "activity"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_mode_engines_equal_sim(name, perturbation):
    build, dtype = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    idx, y = torch.randint(0, 12, (5, 7)), torch.arange(5) % 3
    frames, labels = torch.randn(5, 7, 4, dtype=dtype), torch.randint(1, 3, (5, 3))
    reduction = "none" if perturbation == "activity" else "mean"

    def loss_fn(m):
        if name == "ctc":
            return F.ctc_loss(m(frames), labels, [7] * 5, [3, 2, 3, 1, 2], reduction=reduction)
        return F.cross_entropy(m(idx), y, reduction=reduction)

    estimates = {}
    for engine in ("sim", "jvp", "loop"):
        m = copy.deepcopy(model)
        frog.ForwardGradient(4, engine=engine, seed=1, perturbation=perturbation).fill_grad(m, loss_fn)
        estimates[engine] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for engine in ("jvp", "loop"):
        assert float((estimates[engine] - estimates["sim"]).norm() / estimates["sim"].norm()) < tol, engine


class Checkpointed(nn.Module):
    """Two segments under activation checkpointing, one reentrant (the old default), one not."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.second = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.first, x, use_reentrant=True)
        return self.head(torch.utils.checkpoint.checkpoint(self.second, h, use_reentrant=False))


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim", "fd"])
def test_activation_checkpoints_give_the_exact_gradient(engine):
    """With k = n basis tangents every engine must give autograd's gradient. Without frog's plain
    checkpoints, jvp and loop fail (no jvp rule) and sim silently misses the reentrant segment."""
    torch.manual_seed(0)
    model = Checkpointed().double()
    x, y = torch.randn(6, 4, dtype=F64), torch.arange(6) % 3
    exact_model = copy.deepcopy(model)
    F.cross_entropy(exact_model(x.requires_grad_()), y).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in exact_model.parameters()])
    n = exact.numel()
    fg = frog.ForwardGradient(n, sampler="basis", engine=engine, scale_correction=False, fd_step=1e-6)
    fg.fill_grad(model, lambda m: F.cross_entropy(m(x), y))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, exact, rtol=1e-6 if engine == "fd" else 1e-10, atol=1e-8 if engine == "fd" else 1e-12)


class PaddedLM(nn.Module):
    """An embedding with padding_idx, its weight tied to the output layer (as RoBERTa's): backprop gives
    the padding row a gradient from the output layer only, none from the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=1)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx)))).mean(1)


@pytest.mark.parametrize("engine", ["jvp", "loop", "sim"])
def test_padding_rows_get_backprops_gradient(engine):
    """k = n basis tangents: the estimate is autograd's gradient, whose padding row has only the tied
    output layer's part (PyTorch's forward-mode rule for embedding would add the lookup's part)."""
    torch.manual_seed(0)
    model = PaddedLM().double()
    idx, y = torch.tensor([[1, 2, 1, 3], [4, 1, 5, 0]]), torch.tensor([2, 4])
    exact_model = copy.deepcopy(model)
    F.cross_entropy(exact_model(idx), y).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in exact_model.parameters()])
    fg = frog.ForwardGradient(exact.numel(), sampler="basis", engine=engine, scale_correction=False)
    fg.fill_grad(model, lambda m: F.cross_entropy(m(idx), y))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


def test_embedding_values_and_padding_tangents():
    weight = table()
    idx = torch.tensor([[0, 2, 9], [2, 5, 2]])
    torch.testing.assert_close(embedding(idx, weight, 2), F.embedding(idx, weight, 2), rtol=0, atol=0)
    _, tangent = torch.func.jvp(lambda w: embedding(idx, w, 2), (weight,), (torch.ones_like(weight),))
    assert torch.equal(tangent[idx == 2], torch.zeros(3, 4, dtype=F64)) and bool((tangent[idx != 2] == 1).all())


def test_requires_grad_in_the_forward_pass_and_checkpoints_as_hugging_face_uses_them():
    """Hugging Face's gradient checkpointing: a forward hook calls requires_grad_() on the embedding output
    (which torch.func transforms refuse), and segments run under non-reentrant checkpoints."""
    torch.manual_seed(0)
    model = Checkpointed().double()
    model.first.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    x, y = torch.randn(6, 4, dtype=F64), torch.arange(6) % 3
    estimates = {}
    for engine in ("sim", "jvp", "loop"):
        m = copy.deepcopy(model)
        frog.ForwardGradient(4, engine=engine, seed=2).fill_grad(m, lambda m: F.cross_entropy(m(x), y))
        estimates[engine] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    for engine in ("jvp", "loop"):
        torch.testing.assert_close(estimates[engine], estimates["sim"], rtol=1e-10, atol=1e-12)
    assert not torch.randn(2).requires_grad_(True).grad_fn and torch.ones(1).requires_grad_().requires_grad  # restored
