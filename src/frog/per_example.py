"""Activity tangents per example, masked at inactive ReLU units, and with guesses first
(docs/guides/closing-the-gap.md).

The paper shares one tangent per block output across the batch. Here block b's tangents are
V_b (k, B, *features_b), one independent row per example (:class:`~frog.layouts.PerExample`):

- rows 0 .. L-1 are the guesses (:mod:`frog.guesses`), one per guessed block: row l is the guess
  of block b_l, normalized per example, in that block and zero in the others;
- rows L .. k-1 are random, drawn from the estimator's seed like any tangent plan, either one set
  shared by the batch (broadcast) or independent per example;
- ``relu_mask`` zeroes the random rows where a block's output is exactly 0 and that zero cannot
  reach the block's parameters (an inactive ReLU unit): there the block's weight gradient ignores
  the activity gradient, so noise there only dilutes the projection.

Outputs without batch dimension (a position embedding shared by the batch) keep dense shared rows
and get no guess. The result is a :class:`~frog.tangents.TangentPlan` holding these rows, so every
engine and the aggregation use it unchanged: the Gram matrix becomes (B, k, k) and each example
solves its own projection.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .guesses import entry_guesses
from .layouts import Dense, Layout, PerExample
from .tangents import TangentPlan

EXAMPLE_KINDS = ("normal", "rademacher")


class MaskCheck:
    """Which blocks' zero outputs are inactive units: decided once per block, on the first batch with a
    zero output, by one block-local backward product of random numbers placed on the zeros only: the
    zeros are inactive when no parameter of the block receives anything from them (exactly zero, as
    through a ReLU, a max-pool after it, or dropout)."""

    def __init__(self) -> None:
        # keyed by the block itself, held weakly: a freed model's entries go with it (an id could be reused)
        self.decided: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def mask(self, block: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        """(B, *features) float mask of the active units of ``output``, or None (keep every unit)."""
        zero = output.detach() == 0
        if not bool(zero.any()):
            return None
        key = block
        if key not in self.decided:
            params = [p for p in block.parameters() if p.requires_grad]
            probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output) * zero
            reached = torch.autograd.grad(output, params, probe, retain_graph=True, allow_unused=True) \
                if output.requires_grad and params else ()
            self.decided[key] = all(g is None or not bool(g.any()) for g in reached)
        return (~zero).to(output.dtype) if self.decided[key] else None


def check_example_kind(kind: str, normalize: bool) -> None:
    """ValueError unless per-example rows can use the sampler ``kind`` (i.i.d. entries, no mixing)."""
    if kind not in EXAMPLE_KINDS or normalize:
        raise ValueError(f"per-example activity tangents and guesses draw i.i.d. rows: use sampler='normal' or "
                         f"'rademacher' without normalize, not {kind!r}" + (" with normalize" if normalize else ""))


Guesses = list[list[torch.Tensor]]  # per block, its guesses (B, *features_b): none, one, or several


def checked_guesses(guesses: Sequence[Any], outputs: Sequence[torch.Tensor], shared: Sequence[bool],
                    labels: Sequence[str]) -> Guesses:
    """A guess source's answer as a list of guesses per block (an entry None: none; a tensor: one; a tuple
    or list of tensors: several), each shaped like its block's per-sample output; else a ValueError that
    names the block and both shapes."""
    guesses = list(guesses)
    if len(guesses) != len(outputs):
        raise ValueError(f"a guess source must return one entry per block ({len(outputs)}), got {len(guesses)}")
    checked: Guesses = []
    for entry, h, s, label in zip(guesses, outputs, shared, labels, strict=True):
        given = entry_guesses(entry)
        if given and s:
            raise ValueError(f"{label} has an output shared by the batch {tuple(h.shape)}: it takes no per-example "
                             "guess; return None for it")
        for guess in given:
            if not isinstance(guess, torch.Tensor) or guess.shape != h.shape:
                got = tuple(guess.shape) if isinstance(guess, torch.Tensor) else type(guess).__name__
                raise ValueError(f"the guess for {label} must have the shape of its output {tuple(h.shape)}, got {got}")
        checked.append(given)
    return checked


def example_plan(
    random: TangentPlan | None,
    num_tangents: int,
    features: Sequence[torch.Size],
    outputs: Sequence[torch.Tensor],
    shared: Sequence[bool],
    *,
    per_example: bool,
    masks: Sequence[torch.Tensor | None],
    guesses: Guesses,
    track_gram: bool = True,
    block_local: bool = False,
) -> TangentPlan:
    """The plan of k activity tangents with guesses first, then random rows (module docstring).

    Args:
        random: a plan of the k - G random rows, drawn for the blocks' ``features`` (shared rows) or
            for (B, *features) (``per_example``); None when the G guesses fill all k tangents.
        num_tangents: k.
        outputs: the block outputs (B, *features_b) (or shared, without the batch).
        shared: which outputs have no batch dimension.
        masks: per block None or (B, *features_b), multiplied into the random rows.
        guesses: per block its guesses (B, *features_b) (:func:`checked_guesses`): one row each, in block
            order, normalized per example, in its block and zero in the others.
        track_gram: whether the plan forms its Gram matrix as the blocks are given (projection).
        block_local: random row j lives in block j mod L only (zero in the others), so that its jvp
            measures that block's gradient alone.
    """
    slots = [(b, guess) for b, given in enumerate(guesses) for guess in given]
    k, first = num_tangents, len(slots)
    if first > k:
        raise ValueError(f"the guess source gives {first} guesses, one tangent each, but k = {k}: use at least "
                         f"{first} tangents")
    batch = next(h.shape[0] for h, s in zip(outputs, shared, strict=True) if not s)
    layouts: list[Layout] = [Dense(f) if s else PerExample(f, batch) for f, s in zip(features, shared, strict=True)]
    like = outputs[0]
    # every block is given below, so the plan's kind, seed and step draw nothing
    plan = TangentPlan("normal", k, features, seed=0, step=0, device=like.device, dtype=like.dtype,
                       cache=True, track_gram=track_gram, layouts=layouts)
    for b, layout in enumerate(layouts):
        rows = torch.zeros(k, *layout.stored, device=like.device, dtype=like.dtype)
        if random is not None:  # shared (k - G, *f), or (k - G, B, *f) per example
            drawn = random.block(b)
            rows[first:] = drawn if per_example or not isinstance(layout, PerExample) else drawn.unsqueeze(1)
            if block_local:
                elsewhere = [first + j for j in range(k - first) if j % len(layouts) != b]
                rows[elsewhere] = 0
        if isinstance(layout, PerExample):
            mask = masks[b]
            for slot, (owner, given) in enumerate(slots):
                if owner == b:
                    guess = given.detach().to(rows.dtype)
                    if mask is not None:
                        guess = guess * mask
                    norms = guess.flatten(1).norm(dim=1).clamp_min(torch.finfo(rows.dtype).tiny)
                    rows[slot] = guess / norms.reshape(-1, *[1] * (guess.dim() - 1))
            if mask is not None:
                rows[first:] *= mask
        plan.give(b, rows)
    return plan
