"""The same random masks in every pass of a step.

frog's engines run a model several times a step (a plain pass, then the jvp, sim or fd passes) and
replay the random state before each (:class:`frog.engines.RngReplay`), so that dropout drops the same
units in each. Two things in PyTorch break that, and :func:`same_masks` (around every ``fill_grad``)
mends both:

- ``F.dropout`` draws its mask in the memory order of its input (``empty_like(x).bernoulli_()``), and
  forward mode may lay out the same tensor differently (a transposed attention output, for one). Within
  the context, :func:`dropout` draws the mask in the logical order of the input's shape: for contiguous
  inputs the same numbers as PyTorch's CPU kernel, and in every pass the same mask for the same element.
- The fused attention kernels draw their dropout masks in their own way, unlike frog's attention (which
  the forward-mode engines need). Within the context, attention with dropout runs frog's in every pass.

Feature dropout (``Dropout1d/2d/3d``) already draws its (B, C) noise in logical order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .attention import frog_when_dropping
from .patching import patched

_original_dropout = F.dropout  # PyTorch's, captured at import


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` with its mask drawn in the logical (row-major) order of ``input.shape``; same arguments.

    input: any shape. Each kept element is scaled by 1 / (1 - p), as PyTorch does.
    """
    if not training or not 0.0 < p < 1.0 or torch.overrides.has_torch_function_unary(input):
        return _original_dropout(input, p, training, inplace)
    keep = torch.empty(input.shape, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p).div_(1.0 - p)
    return input.mul_(keep) if inplace else input * keep


@contextmanager
def same_masks() -> Iterator[None]:
    """Within the context ``F.dropout`` is :func:`dropout` and ``F.scaled_dot_product_attention`` runs
    frog's attention where it drops (module docstring). Not thread-safe (it patches a module)."""
    with patched(F, "dropout", dropout), patched(F, "scaled_dot_product_attention", frog_when_dropping):
        yield
