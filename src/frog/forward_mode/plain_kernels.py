"""Plain kernels in place of fused ones that have no forward-mode (jvp) rule.

Some of PyTorch's fused kernels cannot run under ``torch.func.jvp``. Within :func:`forward_mode_kernels`,
which the ``jvp`` and ``loop`` engines enter, these layers work unchanged:

- ``nn.LSTM`` (and ``nn.GRU`` / ``nn.RNN``): oneDNN's LSTM on the CPU (float32) and cuDNN's recurrent
  kernels on CUDA have no forward-mode rule. The recurrent functions then run with oneDNN and cuDNN
  switched off, on PyTorch's own cells, which have one.
- Weight normalization (``nn.utils.parametrizations.weight_norm``): ``torch._weight_norm`` becomes its
  formula, w = g v / |v| (the norm over every dimension but ``dim``).
- ``nn.EmbeddingBag`` / ``F.embedding_bag`` with mode ``sum`` or ``mean``: it becomes an embedding
  lookup and a per-bag sum (``index_add``), with ``offsets``, ``per_sample_weights``,
  ``include_last_offset`` and ``padding_idx``. Mode ``max`` keeps PyTorch's kernel.
- ``nn.Embedding`` with ``padding_idx``: autograd gives the padding row no gradient from the lookup,
  but PyTorch's forward-mode rule differentiates it too, so ``jvp`` would estimate, and train, a row that
  backprop keeps fixed. Looked-up padding positions carry no tangent here (tied weights keep the
  derivative through their other uses).
- ``F.ctc_loss``: PyTorch has no jvp rule for it. Each sample's loss is a scalar, so its jvp is the
  inner product of the tangent with the loss's gradient, which PyTorch's CTC backward kernel computes
  (alpha-beta recursion, one call for all k tangents).

Besides, within the context ``Tensor.requires_grad_`` leaves tensors as they are: a call of it under
``torch.func`` transforms raises, and models call it in their forward pass (Hugging Face's
``enable_input_require_grads``, which gradient checkpointing turns on), while forward mode needs no
``requires_grad``. And :func:`plain_checkpoints` (around every ``fill_grad``, whatever the engine) runs
activation checkpoints (``torch.utils.checkpoint.checkpoint``) as plain calls.

The values are those of the fused kernels up to rounding (tests). Code that calls these functions
through their modules is routed (``torch._weight_norm``, ``F.embedding``, ``F.embedding_bag``,
``F.ctc_loss``, the recurrent layers' ``torch._VF``); not thread-safe (it patches modules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import _VF
from torch.utils.checkpoint import CheckpointFunction

from .patching import patched

RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")  # the torch._VF functions of nn.LSTM, nn.GRU and nn.RNN

_original_embedding = F.embedding  # PyTorch's, captured at import
_original_embedding_bag = F.embedding_bag


def _without_fused_backends(recurrent: Callable) -> Callable:
    """``recurrent`` run with oneDNN and cuDNN switched off (PyTorch's own cells, which have jvp rules)."""

    def run(*args, **kwargs):
        mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False  # type: ignore[assignment]
        try:
            return recurrent(*args, **kwargs)
        finally:
            torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = mkldnn, cudnn

    return run


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm``: g v / |v|, the norm over every dimension of v but ``dim`` (all for -1)."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, *args, **kwargs) -> torch.Tensor:
    """``F.embedding`` whose outputs at ``padding_idx`` carry no derivative, as in autograd; same arguments.
    input (*) indices, weight (num_embeddings, D) -> (*, D)."""
    out = _original_embedding(input, weight, padding_idx, *args, **kwargs)
    if padding_idx is None:
        return out
    padding = padding_idx % weight.shape[0]
    return torch.where((input == padding).unsqueeze(-1), out.detach(), out)


def embedding_bag(input: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None = None,
                  max_norm: float | None = None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                  mode: str = "mean", sparse: bool = False, per_sample_weights: torch.Tensor | None = None,
                  include_last_offset: bool = False, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding_bag`` for modes ``sum`` and ``mean`` from an embedding lookup and a per-bag sum;
    same arguments. input (B, L) (B bags of L indices) or (N,) with offsets (B,) (B + 1 with
    include_last_offset) -> (B, D); empty bags and ``padding_idx`` entries add nothing (a mean counts
    the others)."""
    if mode not in ("sum", "mean") or max_norm is not None:
        return _original_embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
                                       sparse, per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:  # fixed-length bags
        bags = input.shape[0]
        bag_of = torch.arange(bags, device=input.device).repeat_interleave(input.shape[1])
        indices = input.reshape(-1)
        weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    else:  # bag i is input[offsets[i]:offsets[i + 1]] (offsets[0] = 0), the last one up to the end
        if offsets is None:
            raise ValueError("embedding_bag: offsets has to be a 1D Tensor but got None")  # as F.embedding_bag
        bags = offsets.numel() - (1 if include_last_offset else 0)
        ends = offsets[1:] if include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([input.numel()])])
        bag_of = torch.arange(bags, device=input.device).repeat_interleave(ends - offsets[:bags])
        indices = input[:bag_of.numel()]
        weights = per_sample_weights
    rows = weight[indices]  # (N, D)
    counted = torch.ones_like(indices, dtype=weight.dtype)
    if padding_idx is not None:
        counted = counted * (indices != (padding_idx % weight.shape[0]))
    scale = counted if weights is None else counted * weights[:indices.numel()]
    total = rows.new_zeros(bags, weight.shape[1]).index_add(0, bag_of, rows * scale.unsqueeze(1))
    if mode == "sum":
        return total
    counts = counted.new_zeros(bags).index_add(0, bag_of, counted)
    return total / counts.clamp_min(1).unsqueeze(1)


class _CTCLoss(torch.autograd.Function):
    """Per-sample CTC negative log-likelihoods (B,) of log_probs (T, B, C), with the jvp
    sum_{t, c} dL_b/dlogp[t, b, c] * dlogp[t, b, c] from PyTorch's CTC gradient kernel."""

    generate_vmap_rule = True

    @staticmethod
    def forward(log_probs, targets, input_lengths, target_lengths, blank: int, zero_infinity: bool):
        return torch.ops.aten._ctc_loss.Tensor(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_probs, targets, input_lengths, target_lengths, blank, zero_infinity = inputs
        nll, log_alpha = output
        ctx.mark_non_differentiable(log_alpha)
        ctx.blank, ctx.zero_infinity = blank, zero_infinity
        ctx.save_for_forward(log_probs, targets, input_lengths, target_lengths, nll, log_alpha)
        ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, nll, log_alpha)

    @staticmethod
    def _gradient(ctx, grad_nll: torch.Tensor) -> torch.Tensor:
        log_probs, targets, input_lengths, target_lengths, nll, log_alpha = ctx.saved_tensors
        return torch.ops.aten._ctc_loss_backward.Tensor(grad_nll, log_probs, targets, input_lengths, target_lengths,
                                                        nll, log_alpha, ctx.blank, ctx.zero_infinity)

    @staticmethod
    def jvp(ctx, d_log_probs, *_):
        nll = ctx.saved_tensors[4]
        return (_CTCLoss._gradient(ctx, torch.ones_like(nll)) * d_log_probs).sum((0, 2)), None

    @staticmethod
    def backward(ctx, grad_nll, _grad_alpha):
        return _CTCLoss._gradient(ctx, grad_nll), None, None, None, None, None


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths, target_lengths, blank: int = 0,
             reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
    """``F.ctc_loss`` with a forward-mode rule; same arguments. log_probs (T, B, C) or (T, C); targets
    (B, S) padded or concatenated; lengths as tensors or sequences of ints. Reductions as PyTorch's:
    'mean' divides each sample's loss by its target length (at least 1), then averages."""
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs, targets = log_probs.unsqueeze(1), targets.unsqueeze(0)
    as_lengths = lambda lengths: torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    input_lengths, target_lengths = as_lengths(input_lengths), as_lengths(target_lengths)
    nll = _CTCLoss.apply(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)[0]
    if zero_infinity:
        nll = torch.where(nll == torch.inf, torch.zeros((), dtype=nll.dtype, device=nll.device), nll)
    if reduction == "mean":
        return (nll / target_lengths.to(nll.device, nll.dtype).clamp_min(1)).mean()
    if reduction == "sum":
        return nll.sum()
    return nll[0] if unbatched else nll


def _call_directly(function: Callable, preserve_rng_state: bool, *args):
    """``CheckpointFunction.apply`` within :func:`plain_checkpoints`: the function, called once."""
    return function(*args)


def _no_checkpoint(*args, **kwargs) -> Iterator[None]:
    """The non-reentrant checkpoint's context generator within :func:`plain_checkpoints`: nothing
    before or after the function."""
    yield


def _unchanged(tensor: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """``Tensor.requires_grad_`` within :func:`forward_mode_kernels`."""
    return tensor


@contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Within the context an activation checkpoint calls its function directly, without saving or
    recomputing anything.
    - A reentrant checkpoint's autograd Function has no jvp rule. In a backward pass it recomputes the
      segment with the modules' own parameters, but frog's passes call the model with other tensors in
      their place, so ``sim``'s gradients would miss that segment.
    - A non-reentrant checkpoint refuses ``sim``'s second use of its saved tensors.

    Forward mode keeps no activations, so nothing is lost there; ``sim`` keeps the segment's
    activations for its backward pass."""
    with ExitStack() as stack:
        stack.enter_context(patched(CheckpointFunction, "apply", staticmethod(_call_directly)))
        stack.enter_context(patched(torch.utils.checkpoint, "_checkpoint_without_reentrant_generator",
                                     _no_checkpoint))
        yield


@contextmanager
def forward_mode_kernels() -> Iterator[None]:
    """Within the context the kernels of the module docstring are replaced by plain ones."""
    with ExitStack() as stack:
        for name in RECURRENT:
            stack.enter_context(patched(_VF, name, _without_fused_backends(getattr(_VF, name))))
        stack.enter_context(patched(torch, "_weight_norm", weight_norm))
        stack.enter_context(patched(F, "embedding", embedding))
        stack.enter_context(patched(F, "embedding_bag", embedding_bag))
        stack.enter_context(patched(F, "ctc_loss", ctc_loss))
        stack.enter_context(patched(torch.Tensor, "requires_grad_", _unchanged))
        yield
