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

The values are those of the fused kernels up to rounding (tests). Code that calls these functions
through their modules is routed (``torch._weight_norm``, ``F.embedding_bag``, the recurrent layers'
``torch._VF``); not thread-safe (it patches modules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import _VF

RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")  # the torch._VF functions of nn.LSTM, nn.GRU and nn.RNN

_original_embedding_bag = F.embedding_bag  # PyTorch's, captured at import


def _without_fused_backends(recurrent: Callable) -> Callable:
    """``recurrent`` run with oneDNN and cuDNN switched off (PyTorch's own cells, which have jvp rules)."""

    def run(*args, **kwargs):
        mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
        try:
            return recurrent(*args, **kwargs)
        finally:
            torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = mkldnn, cudnn

    return run


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm``: g v / |v|, the norm over every dimension of v but ``dim`` (all for -1)."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


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


@contextmanager
def _patched(owner, name: str, replacement) -> Iterator[None]:
    """owner.name = replacement within the context (restored as it was, also when nested)."""
    had, before = name in vars(owner), vars(owner).get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, before)
        else:
            delattr(owner, name)


@contextmanager
def forward_mode_kernels() -> Iterator[None]:
    """Within the context the kernels of the module docstring are replaced by plain ones."""
    with ExitStack() as stack:
        for name in RECURRENT:
            stack.enter_context(_patched(_VF, name, _without_fused_backends(getattr(_VF, name))))
        stack.enter_context(_patched(torch, "_weight_norm", weight_norm))
        stack.enter_context(_patched(F, "embedding_bag", embedding_bag))
        yield
