r"""Greedy local learning: every hidden block trained by its own local loss, the last by the true loss.

Greedy (decoupled) local learning (Belilovsky et al. 2019 and 2020; Nøkland and Eidnes 2019) trains
each hidden block b by the loss of a small auxiliary head on its output, with the block's inputs
detached, and the last block by the network's loss. No gradient crosses a block boundary, and no
forward gradient is needed.

In frog's terms it is the activity estimate with V = the guesses and c = 1: block b's output gradient
is taken to be its guess gamma_b (:mod:`frog.guesses`), and the block's weight gradient is the
block-local product (1/B) sum_i (dh_{b,i}/dtheta_b)^T gamma_{b,i}. frog with guesses
(``ForwardGradient(..., guess=...)``) uses the same gamma_b with c_b = <g_b, gamma_b> / |gamma_b|^2 from the
jvps, the true gradient's component along the guess, plus random tangents. So local learning with a
guess source is the baseline that shows what frog's projection adds to that source.

Memory: with a guess source that streams (:class:`frog.LocalHeads`: each block's guess from its output
alone), each block is trained inside the forward pass as soon as it has run, and its graph is dropped
before the next block runs: the step holds one block's graph at a time (and the last block's, up to the
loss). Other sources (:class:`frog.TopDown`, your own) see every output first, so the step holds every
block's graph, as backprop does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .activity import block_labels, blocks_of, check_local, local_graphs, shared_by_batch
from .distributed import unwrap_replicas
from .guesses import GuessSource, output_gradient
from .interface import (
    PER_SAMPLE,
    GradientEstimator,
    LossFn,
    StepEstimates,
    StepState,
    check_finite,
    per_sample_losses,
    release,
    trainable_parameters,
)
from .per_example import checked_guesses


class LocalLearning(GradientEstimator):
    r"""Greedy local learning behind the estimator interface: the gradient of block b is that of its guess
    source's local loss (:class:`frog.LocalHeads`: a head's cross-entropy), its inputs detached; the last
    block's is that of the true loss (module docstring).

    ``loss_fn(model)`` returns per-sample losses (B,) (or (B, ...), averaged per sample), as for activity
    perturbation, and :meth:`fill_grad` needs the batch's ``targets`` for the heads.

    Example::

        local = LocalLearning(LocalHeads(10, hidden_channels=32))
        loss = local.fill_grad(model, lambda m: F.cross_entropy(m(x), y, reduction="none"), targets=y)
        optimizer.step()

    Args:
        guess: the guess source whose guesses are used as the blocks' output gradients:
            :class:`frog.LocalHeads` (its heads' options: hidden channels, class tokens, head lr) or
            :class:`frog.TopDown` (the gradient at the top of a residual stream, used directly), or your own.
        blocks: the blocks (default: found automatically, as for activity perturbation,
            :func:`frog.describe_blocks`).
    """

    loss_contract = PER_SAMPLE

    def __init__(self, guess: GuessSource, *, blocks: Sequence[nn.Module] | None = None) -> None:
        if not isinstance(guess, GuessSource):
            raise ValueError(f"guess must be a frog.GuessSource (e.g. LocalHeads(num_classes)), got "
                             f"{type(guess).__name__}")
        self.guess, self.blocks, self.state = guess, blocks, StepState()
        self._warned = False

    def __repr__(self) -> str:
        return f"LocalLearning(guess={type(self.guess).__name__}, calls={self.calls})"

    def state_dict(self) -> dict[str, Any]:
        return {**self.state.state_dict(), "guess": self.guess.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self.guess.load_state_dict(state.get("guess", {}))

    def estimates(self, model: nn.Module, loss_fn: LossFn, *, targets: Any = None,
                  release_grads: bool = False) -> StepEstimates:
        model, communicator = unwrap_replicas(model)
        params = trainable_parameters(model)
        if release_grads:
            release(params.values())
        blocks = blocks_of(model, self.blocks)
        run = _stream if self.guess.streams else _after_pass
        losses, grads = run(self.guess, model, loss_fn, blocks, params, targets)
        check_finite(self.calls, losses)
        self.state.advance()
        unreached = [name for name in params if name not in grads]
        if unreached and not self._warned:
            self._warned = True
            warnings.warn(f"local learning: {', '.join(unreached[:5])} get no gradient (their blocks have no guess: "
                          "an output shared by the batch, or a source that gives none)", stacklevel=3)
        estimates = {name: grads[name] if name in grads else torch.zeros_like(p) for name, p in params.items()}
        if communicator is not None:
            estimates = {name: communicator.all_reduce_mean(g) for name, g in estimates.items()}
        return StepEstimates(losses.detach().mean(), params, iter(estimates.items()))


def _block_parameters(blocks: Sequence[nn.Module]) -> list[list[nn.Parameter]]:
    """Each block's trainable parameters (a parameter tied between blocks appears in each)."""
    return [list({id(p): p for p in block.parameters() if p.requires_grad}.values()) for block in blocks]


def _accumulate(grads: dict[str, torch.Tensor], names: dict[int, str], params: Sequence[nn.Parameter],
                found: Sequence[torch.Tensor | None]) -> None:
    """grads[name] += each found gradient (tied parameters get the sum over their blocks)."""
    for p, g in zip(params, found, strict=True):
        if g is not None:
            name = names[id(p)]
            grads[name] = grads[name] + g if name in grads else g


def _untracked(label: str) -> ValueError:
    return ValueError(f"{label} returned an output without autograd graph (computed under torch.no_grad() or "
                      "detached), so its parameters cannot be trained: freeze them (requires_grad_(False)) or pass "
                      "blocks=[...] without that module")


def _stream(guess: GuessSource, model: nn.Module, loss_fn: LossFn, blocks: Sequence[nn.Module],
            params: dict[str, nn.Parameter], targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train each hidden block as it returns (its guess from ``guess.block_guess``, then the block-local
    product), hand the next block its output detached, then the last block by the true loss."""
    names = {id(p): n for n, p in params.items()}
    labels = block_labels(model, blocks)
    owned = _block_parameters(blocks)
    last = len(blocks) - 1
    grads: dict[str, torch.Tensor] = {}
    batch: list[int] = []

    def train_block(index: int, output: torch.Tensor) -> torch.Tensor | None:
        if index == last:
            return None
        if owned[index] and not output.requires_grad:
            raise _untracked(labels[index])
        row = guess.block_guess(index, output, targets)
        if row is not None and owned[index]:
            if row.shape != output.shape:
                raise ValueError(f"the guess for {labels[index]} must have the shape of its output "
                                 f"{tuple(output.shape)}, got {tuple(row.shape)}")
            batch.append(output.shape[0])
            found = torch.autograd.grad(output, owned[index], row.to(output.dtype) / output.shape[0],
                                        allow_unused=True)
            _accumulate(grads, names, owned[index], found)
        return output.detach()

    with torch.enable_grad(), local_graphs(blocks, names=labels, parameters=names, on_output=train_block) as (_, outputs):
        losses = per_sample_losses(loss_fn(model))
    guess.end_step()
    check_local([losses], outputs, names, "after the last block")
    if any(size != losses.shape[0] for size in batch):
        raise ValueError(f"the hidden blocks' outputs have batch sizes {sorted(set(batch))}, the per-sample losses "
                         f"{losses.shape[0]}: return one loss per example")
    if owned[last]:
        if not outputs[-1].requires_grad:
            raise _untracked(labels[last])
        found = torch.autograd.grad(losses.mean(), owned[last], allow_unused=True)
        _accumulate(grads, names, owned[last], found)
    return losses, grads


def _after_pass(guess: GuessSource, model: nn.Module, loss_fn: LossFn, blocks: Sequence[nn.Module],
                params: dict[str, nn.Parameter], targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pass with block-local graphs, the guesses of every block, the last block's exact output
    gradient, then each block's product (1/B) (dh_b/dtheta_b)^T gamma_b."""
    names = {id(p): n for n, p in params.items()}
    labels = block_labels(model, blocks)
    with torch.enable_grad(), local_graphs(blocks, guess.needs_inputs, labels, names) as (inputs, outputs):
        losses = per_sample_losses(loss_fn(model))
    check_local([losses], outputs, names, "after the last block")
    untracked = [label for label, h, p in zip(labels, outputs, _block_parameters(blocks), strict=True)
                 if p and not h.requires_grad]
    if untracked:
        raise _untracked(untracked[0])
    batch = losses.shape[0]
    shared = [shared_by_batch(h, batch) for h in outputs]
    extra = {"inputs": inputs} if guess.needs_inputs else {}
    given = checked_guesses(guess.guesses(outputs, targets, losses, **extra), outputs, shared, labels)
    rows = [block[0] if block else None for block in given]  # a block's first guess, as it is
    rows[-1] = output_gradient(losses, outputs[-1])  # the last block: the true loss
    chosen = [(outputs[b], row.to(outputs[b].dtype) / batch) for b, row in enumerate(rows)
              if row is not None and outputs[b].requires_grad]
    grads: dict[str, torch.Tensor] = {}
    if chosen:
        ordered = list(params.values())
        found = torch.autograd.grad([h for h, _ in chosen], ordered, [g for _, g in chosen], allow_unused=True)
        _accumulate(grads, names, ordered, found)
    return losses, grads
