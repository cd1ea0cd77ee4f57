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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .engines import RngReplay, check_scalar
from .errors import NonFiniteError
from .forward_mode.batchnorm import frozen_running_stats
from .forward_mode.masks import same_masks
from .tangents import derive_seed

LossFn = Callable[[nn.Module], torch.Tensor]


class MeZO:
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

    perturbation = "weight"  # what the training loop asks of an estimator: a scalar loss

    def __init__(self, eps: float = 1e-3, directions: int = 1, seed: int = 0) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ValueError(f"directions must be an integer >= 1, got {directions!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.eps, self.directions, self.seed = float(eps), directions, seed
        self.step = 0  # the call counter: each call draws new directions

    def __repr__(self) -> str:
        return f"MeZO(eps={self.eps:g}, directions={self.directions}, seed={self.seed}, step={self.step})"

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def direction(self, parameter: torch.Tensor, call: int, j: int, index: int) -> torch.Tensor:
        """The entries of direction j for the ``index``-th parameter at call ``call`` (the parameter's shape)."""
        generator = torch.Generator(device=parameter.device).manual_seed(derive_seed(self.seed, call, j, index))
        return torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)

    @torch.no_grad()
    def _add(self, params: list[torch.Tensor], call: int, scales: list[float]) -> None:
        """theta <- theta + sum_j scales[j] z_j, one parameter tensor (and one z) at a time."""
        for index, p in enumerate(params):
            for j, scale in enumerate(scales):
                if scale != 0.0:
                    p.add_(self.direction(p, call, j, index), alpha=scale)

    def projected_gradients(self, model: nn.Module, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, g (q,)): g_j = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps), the loss being the
        mean of the 2 q perturbed losses. Every pass sees the same random numbers (dropout masks);
        BatchNorm's running statistics are updated by the first pass only. Advances the call counter."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params, call = _trainable(model), self.step
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
        if not torch.isfinite(pairs).all():
            raise NonFiniteError(f"step {call}: the loss became non-finite ({pairs.flatten().tolist()}); "
                                 "the iterate diverged: use a smaller learning rate")
        self.step += 1
        return pairs.mean().to(params[0].dtype), (pairs[:, 0] - pairs[:, 1]) / (2 * self.eps)

    def fill_grad(self, model: nn.Module, loss_fn: LossFn, *, accumulate: bool = False, targets: Any = None) -> torch.Tensor:
        """Set ``p.grad`` of every trainable parameter to the SPSA estimate (1/q) sum_j g_j z_j (for a
        ``torch.optim`` optimizer); ``loss_fn(model)`` returns the scalar loss. ``targets`` is ignored
        (the training loop passes it to every estimator). Returns the loss (detached)."""
        call = self.step
        loss, projected = self.projected_gradients(model, loss_fn)
        coeffs = (projected / self.directions).tolist()
        for index, p in enumerate(_trainable(model)):
            estimate = torch.zeros_like(p)
            for j, c in enumerate(coeffs):
                estimate.add_(self.direction(p, call, j, index), alpha=c)
            if accumulate and p.grad is not None:
                p.grad.add_(estimate)
            else:
                p.grad = estimate
        return loss

    def update(self, model: nn.Module, loss_fn: LossFn, lr: float, *, targets: Any = None) -> torch.Tensor:
        """One plain SGD step in place, theta <- theta - lr * estimate, with no gradient buffer (MeZO's
        step): each parameter's directions are generated again from the seed when it is updated."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        call = self.step
        loss, projected = self.projected_gradients(model, loss_fn)
        self._add(_trainable(model), call, (-lr * projected / self.directions).tolist())
        return loss


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True")
    return params
