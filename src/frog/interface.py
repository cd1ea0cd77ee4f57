"""The one interface of every gradient estimator, and the pieces they all share.

:class:`frog.ForwardGradient` (forward gradients), :class:`frog.MeZO` (zeroth order) and
:class:`frog.LocalLearning` (greedy local learning) all estimate the gradient of a loss for an
optimizer. They share :class:`GradientEstimator`, so that a training loop, the CLI and the benchmarks
never ask which one they hold:

- ``fill_grad(model, loss_fn, *, accumulate=False, targets=None) -> loss``: sets ``p.grad`` of every
  trainable parameter to the estimate, for any ``torch.optim`` optimizer;
- ``update(model, loss_fn, lr, *, targets=None) -> loss``: one plain SGD step in place;
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint keeps;
- ``loss_contract``: what ``loss_fn(model)`` returns, :data:`SCALAR` (the loss) or :data:`PER_SAMPLE`
  (per-sample losses (B,) or (B, ...); the estimate is that of their mean);
- ``calls``: the number of estimates made so far (each call draws new random numbers), kept with the
  seed in one :class:`StepState`.

A subclass implements :meth:`GradientEstimator.estimates`; ``fill_grad`` and ``update`` are built on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .checks import check_positive
from .errors import NonFiniteError

SCALAR = "scalar"  # loss_fn(model) returns the scalar loss
PER_SAMPLE = "per-sample"  # loss_fn(model) returns per-sample losses (B,) or (B, ...)
LOSS_CONTRACTS = (SCALAR, PER_SAMPLE)

LossFn = Callable[[nn.Module], torch.Tensor]


class StepEstimates(NamedTuple):
    """What one estimate of a model's gradient gives: the loss (detached), the trainable parameters by
    name, and (name, estimate) pairs, each estimate shaped like its parameter. An estimator may form
    each estimate only when its pair is taken (weight perturbation: one parameter's estimate at a time)."""

    loss: torch.Tensor
    parameters: dict[str, nn.Parameter]
    estimates: Iterator[tuple[str, torch.Tensor]]


@dataclass
class StepState:
    """What an estimator's steps depend on, apart from the model: the ``seed`` and ``calls``, the number of
    estimates made so far (call t draws its random numbers from (seed, t)). Within
    :meth:`frog.ForwardGradient.same_tangents` the step is ``held``: the counter stays put."""

    seed: int = 0
    calls: int = 0
    held: bool = False

    def advance(self) -> None:
        """One estimate made: the next call draws new random numbers (unless held)."""
        if not self.held:
            self.calls += 1

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checkpoints of frog 0.1.0 name the counter ``step``)."""
        self.seed = int(state.get("seed", self.seed))
        self.calls = int(state["calls"] if "calls" in state else state["step"])


class GradientEstimator(ABC):
    """An estimate of the gradient of ``loss_fn(model)`` with respect to the model's trainable parameters
    (module docstring). Subclasses implement :meth:`estimates`, :meth:`state_dict` and
    :meth:`load_state_dict`, set :attr:`loss_contract`, and keep their :class:`StepState` in ``state``."""

    loss_contract: str = SCALAR
    state: StepState

    @property
    def calls(self) -> int:
        """The number of estimates made so far."""
        return self.state.calls

    @property
    def seed(self) -> int:
        """The seed that every call's random numbers derive from."""
        return self.state.seed

    @abstractmethod
    def estimates(self, model: nn.Module, loss_fn: LossFn, *, targets: Any = None,
                  release_grads: bool = False) -> StepEstimates:
        """One estimate of the gradient (:class:`StepEstimates`). ``targets``: the batch's labels, for
        estimators that use them (guesses, local heads); ``release_grads``: drop ``p.grad`` before the
        passes (it is about to be replaced), so that it does not take memory during them."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue with the same numbers (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def fill_grad(self, model: nn.Module, loss_fn: LossFn, *, accumulate: bool = False,
                  targets: Any = None) -> torch.Tensor:
        """Set ``p.grad`` of every trainable parameter to its estimate (added to it with ``accumulate``);
        returns the loss (detached). A ``torch.optim`` optimizer then steps as after ``loss.backward()``."""
        step = self.estimates(model, loss_fn, targets=targets, release_grads=not accumulate)
        write_grads(step.parameters, step.estimates, accumulate)
        return step.loss

    def update(self, model: nn.Module, loss_fn: LossFn, lr: float, *, targets: Any = None) -> torch.Tensor:
        """One plain SGD step in place, p <- p - lr * estimate, without a gradient buffer: ``p.grad`` is
        neither read nor written. Returns the loss (detached)."""
        check_positive("lr", lr)
        step = self.estimates(model, loss_fn, targets=targets)
        with torch.no_grad():
            for name, estimate in step.estimates:
                step.parameters[name].sub_(estimate, alpha=lr)
        return step.loss


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad`` by qualified name (a tied parameter once), or a ValueError."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True")
    return params


def release(params: Iterable[nn.Parameter]) -> None:
    """Drop every ``p.grad`` (it is about to be replaced)."""
    for p in params:
        p.grad = None


def write_grads(params: dict[str, nn.Parameter], estimates: Iterable[tuple[str, torch.Tensor]],
                accumulate: bool) -> None:
    """``p.grad = estimate`` for each (name, estimate), or ``p.grad += estimate`` with ``accumulate``."""
    for name, estimate in estimates:
        p = params[name]
        if accumulate and p.grad is not None:
            p.grad.add_(estimate)
        else:
            p.grad = estimate


def check_finite(call: int, loss: torch.Tensor, jvps: torch.Tensor | None = None) -> None:
    """NonFiniteError, naming the call, when the loss (or the jvps) are not all finite: the iterate diverged."""
    bad_loss = not bool(torch.isfinite(loss).all())
    if bad_loss or (jvps is not None and not bool(torch.isfinite(jvps).all())):
        what = "loss" if bad_loss else "jvps"
        raise NonFiniteError(f"step {call}: the {what} became non-finite (loss {loss.double().mean().item()}); "
                             "the iterate diverged: use a smaller learning rate")


def per_sample_losses(losses: Any) -> torch.Tensor:
    """Per-sample losses (B,) from a loss function of the :data:`PER_SAMPLE` contract: its (B,) output,
    or the mean over the trailing dimensions of (B, ...) (e.g. the token losses (B, T) of a sequence)."""
    if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError("the loss function must return per-sample losses of shape (B,) or (B, ...) here (activity "
                         "perturbation, local learning), e.g. cross_entropy(..., reduction='none'), not the batch's "
                         f"mean; got {shape}")
    return losses if losses.dim() == 1 else losses.flatten(1).mean(1)
