"""MeZO: zeroth-order SPSA with the perturbation applied in place (Malladi et al., NeurIPS 2023).

The baseline frog faces where memory is short. For each of q directions z (one N(0, 1) number per
parameter entry, generated again from a seed wherever it is needed, never stored):

    theta <- theta + eps z;   L+ = L(theta)
    theta <- theta - 2 eps z; L- = L(theta)
    theta <- theta + eps z                          (back to theta, up to rounding)
    g_j = (L+ - L-) / (2 eps)                       the projected gradient, ~ z^T grad L

and the estimate is (1/q) sum_j g_j z_j, whose expectation is the gradient (up to O(eps^2)). A step
costs 2 q forward passes and no memory beyond inference's: :meth:`MeZO.update` applies
theta <- theta - lr (1/q) sum_j g_j z_j in place, one parameter tensor at a time.

Floating-point addition does not undo itself: theta + eps z - 2 eps z + eps z returns theta up to
a rounding of the last bit of some entries (MeZO's own code has the same property). Bit-exact
restoration would need the rounding errors, n more numbers, which is what MeZO exists to avoid.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_int, check_positive
from .engines import RngReplay, check_scalar
from .forward_mode.batchnorm import frozen_running_stats
from .forward_mode.masks import same_masks
from .interface import GradientEstimator, LossFn, StepEstimates, StepState, check_finite, trainable_parameters
from .tangents import derive_seed


class MeZO(GradientEstimator):
    """SPSA gradient estimates with in-place perturbations, as a drop-in for :class:`frog.ForwardGradient`.

    Example::

        mezo = MeZO(eps=1e-3, seed=0)
        loss = mezo.update(model, lambda m: F.cross_entropy(m(xb), yb), lr=1e-4)   # no p.grad at all
        # or, with any torch.optim optimizer (which then holds p.grad, n numbers):
        mezo.fill_grad(model, loss_fn); optimizer.step()

    Args:
        eps: the perturbation's scale (MeZO: 1e-3).
        directions: q, the directions averaged per step (MeZO: 1); a step costs 2 q forward passes.
        seed: direction j of parameter i at call t depends only on (seed, t, j, i).
    """

    def __init__(self, eps: float = 1e-3, directions: int = 1, seed: int = 0) -> None:
        check_positive("eps", eps)
        check_int("directions", directions, 1)
        check_int("seed", seed)
        self.eps, self.directions = float(eps), directions
        self.state = StepState(seed)  # the seed and the call counter: each call draws new directions

    def __repr__(self) -> str:
        return f"MeZO(eps={self.eps:g}, directions={self.directions}, seed={self.seed}, step={self.calls})"

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`calls` (the number of estimates made so far)."""
        warnings.warn("MeZO.step is deprecated: it is the call counter, now named calls", DeprecationWarning,
                      stacklevel=2)
        return self.calls

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    def direction(self, parameter: torch.Tensor, call: int, j: int, index: int) -> torch.Tensor:
        """The entries of direction j for the ``index``-th parameter at call ``call`` (the parameter's shape)."""
        generator = torch.Generator(device=parameter.device).manual_seed(derive_seed(self.seed, call, j, index))
        return torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)

    @torch.no_grad()
    def _add(self, params: Sequence[torch.Tensor], call: int, scales: list[float]) -> None:
        """theta <- theta + sum_j scales[j] z_j, one parameter tensor (and one z) at a time."""
        for index, p in enumerate(params):
            for j, scale in enumerate(scales):
                if scale != 0.0:
                    p.add_(self.direction(p, call, j, index), alpha=scale)

    def projected_gradients(self, model: nn.Module, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, g (q,)): g_j = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps), the loss being the
        mean of the 2 q perturbed losses. Every pass sees the same random numbers (dropout masks);
        BatchNorm's running statistics are updated by the first pass only. Advances the call counter."""
        params, call = list(trainable_parameters(model).values()), self.calls
        replay = RngReplay(params[0].device)
        values: list[torch.Tensor] = []

        def loss_now() -> torch.Tensor:
            replay.reset()
            with frozen_running_stats(freeze=bool(values)):
                return check_scalar(loss_fn(model)).detach().double()

        with torch.no_grad(), same_masks():
            for j in range(self.directions):
                only = [0.0] * j
                self._add(params, call, [*only, self.eps])
                values.append(loss_now())
                self._add(params, call, [*only, -2 * self.eps])
                values.append(loss_now())
                self._add(params, call, [*only, self.eps])
        pairs = torch.stack(values).view(self.directions, 2)
        check_finite(call, pairs)
        self.state.advance()
        return pairs.mean().to(params[0].dtype), (pairs[:, 0] - pairs[:, 1]) / (2 * self.eps)

    def estimates(self, model: nn.Module, loss_fn: LossFn, *, targets: Any = None,
                  release_grads: bool = False) -> StepEstimates:
        """The SPSA estimate (1/q) sum_j g_j z_j of every trainable parameter, each formed (its directions
        generated again from the seed) when its pair is taken; ``loss_fn(model)`` returns the scalar loss.
        ``targets`` is ignored (the training loop passes it to every estimator)."""
        call = self.calls
        loss, projected = self.projected_gradients(model, loss_fn)
        coeffs = (projected / self.directions).tolist()
        params = trainable_parameters(model)

        def estimate(index: int, p: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(p)
            for j, c in enumerate(coeffs):
                total.add_(self.direction(p, call, j, index), alpha=c)
            return total

        pairs = ((name, estimate(index, p)) for index, (name, p) in enumerate(params.items()))
        return StepEstimates(loss, params, pairs)

    def update(self, model: nn.Module, loss_fn: LossFn, lr: float, *, targets: Any = None) -> torch.Tensor:
        """One plain SGD step in place, theta <- theta - lr * estimate, with no gradient buffer (MeZO's
        step): each parameter's directions are generated again from the seed and added to it in place."""
        check_positive("lr", lr)
        call = self.calls
        loss, projected = self.projected_gradients(model, loss_fn)
        self._add(list(trainable_parameters(model).values()), call, (-lr * projected / self.directions).tolist())
        return loss
