"""Weight perturbation: a tangent block per parameter tensor (or per named tensor of a plain function).

The loss is a function of the parameters theta; a step draws k tangents over all of them (block b: the
b-th parameter, shape (k, *shape_b), or its factors with a structured sampler), the engine computes
the jvps d = V grad L, and the estimate of parameter b is V_b^T c. The Gram matrix is accumulated block
by block, so the k x n tangent matrix is never formed; each parameter's estimate is formed only when
it is needed (``update`` holds one at a time).

Structured samplers (``lowrank``, ``input-span``) need to know which known module (Linear, Conv,
Embedding) uses each weight, so that the layer can take the factored tangent directly
(:mod:`frog.factored`): :meth:`WeightPerturbation.weight_users` finds them once per model.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import factored
from .distributed import Communicator
from .engines import Function, RngReplay, check_scalar
from .factored import Users
from .forward_mode.batchnorm import frozen_running_stats
from .interface import SCALAR, LossFn
from .solver import Solver
from .tangents import STRUCTURED, TangentPlan


class _LossOf(nn.Module):
    """Wraps ``loss_fn(model)`` as a module so torch.func.functional_call can swap its tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model)


class WeightPerturbation:
    """``perturbation="weight"``: ``loss_fn(model)`` returns the scalar loss; every trainable parameter is a
    tangent block. Its caches: the known modules using each weight (per model, for structured tangents)
    and the names already warned about."""

    name = "weight"
    loss_contract = SCALAR

    def __init__(self) -> None:
        # model -> (its parameters' ids, the known modules using each weight), checked on first use
        self._users: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Users]] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()

    def estimates(self, solver: Solver, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter],
                  targets: Any, communicator: Communicator | None) -> tuple[torch.Tensor, Iterator[tuple[str, torch.Tensor]]]:
        """(loss, (name, estimate) pairs, each formed when taken); running statistics updated once."""
        wrapper = _LossOf(model, loss_fn)

        def loss_at(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(wrapper, {f"model.{n}": t for n, t in tensors.items()}, (), strict=False)

        users = self.weight_users(model, loss_fn, params) if solver.tangents.sampler in STRUCTURED else None
        with frozen_running_stats(freeze=not solver.engine.single_pass) as frozen:
            value, plan, coeffs = self.solve(solver, loss_at, {n: p.detach() for n, p in params.items()}, users,
                                             communicator)
        if frozen:
            with torch.no_grad():
                loss_fn(model)  # one plain pass updates the running statistics once
        pairs = ((name, plan.estimate(b, coeffs).to(p.dtype)) for b, (name, p) in enumerate(params.items()))
        return value, pairs

    def solve(self, solver: Solver, fn: Function, primals: dict[str, torch.Tensor], users: Users | None = None,
              communicator: Communicator | None = None) -> tuple[torch.Tensor, TangentPlan, torch.Tensor]:
        """(value, plan, coefficients (k,)) of scalar ``fn`` of named tensors: the estimate of block b is
        ``plan.estimate(b, c)``. With ``input-span`` tangents a weight used by exactly one module that frog
        sees the inputs of gets right factors in the span of those inputs, every other matrix plain low rank
        (warned once)."""
        names = list(primals)
        users = users or {}
        input_span = solver.tangents.sampler == "input-span"
        span = [b for b, name in enumerate(names) if input_span and primals[name].dim() >= 2
                and len(users.get(name, ())) == 1 and factored.sees_inputs(users[name][0])]
        if input_span:
            self._warn_low_rank([name for b, name in enumerate(names) if primals[name].dim() >= 2 and b not in span])
        plan = solver.plan([p.shape for p in primals.values()], next(iter(primals.values())), names, span)
        value, coeffs = solver.measure(lambda p: check_scalar(fn(p)), primals, plan, users, communicator)
        return value, plan, coeffs

    def weight_users(self, model: nn.Module, loss_fn: LossFn, params: Mapping[str, torch.Tensor]) -> Users:
        """The known modules (Linear, Conv, Embedding) using each weight of ``model``, for structured tangents.

        On the first call for a model (and again when its parameters change), one plain pass without
        gradients (running statistics and random numbers left as they were) checks that each such
        weight is used by its modules only; weights used anywhere else get dense tangents.
        """
        key = tuple(id(p) for p in params.values())
        cached = self._users.get(model)
        if cached is None or cached[0] != key:
            candidates = factored.weight_users(model, {id(p): name for name, p in params.items()})
            replay = RngReplay(next(iter(params.values())).device)
            with frozen_running_stats(freeze=True), torch.no_grad():
                users = factored.check_uses(model, lambda: loss_fn(model), params, candidates)
            replay.reset()
            cached = self._users[model] = (key, users)
        return cached[1]

    def _warn_low_rank(self, names: list[str]) -> None:
        """Warn once per name that an input-span estimator gives these matrices plain low-rank tangents."""
        new = [name for name in names if name not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"input-span tangents: frog cannot see the inputs of {', '.join(new)} (not the weight of "
                          "one Linear or Conv layer that runs its own forward), so they get lowrank tangents",
                          stacklevel=6)
