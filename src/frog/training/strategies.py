"""Step-size strategies for (forward-)gradient steps: ``sgd``, ``adam``, ``line-search``, ``normalized``.

Each is a ``torch.optim.Optimizer`` that steps along ``p.grad`` (a forward-gradient estimate or the
true gradient); the last two need no tuned step size:

- ``sgd``:         x <- x - lr g (the paper's protocol; lr from a table, a tune or ``--lr``).
- ``adam``:        ``torch.optim.Adam`` at its default lr 1e-3 unless one is given.
- ``line-search``: :class:`ArmijoLineSearch`, a backtracking (Armijo) line search along -g that uses
  only forward passes: one jvp for the slope and the function values of the trial points.
- ``normalized``:  :class:`NormalizedSGD`, steps of length lr / sqrt(t + 1) along -g / |g|.

Use :func:`make_optimizer` to build one and :func:`take_step` to step it (the line search needs the
loss as a function of the parameter values; the others ignore it). :func:`set_scheduled_lr` sets a
step's size from a schedule over the whole run (``constant``, as the paper, or ``cosine`` decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

STRATEGIES = ("sgd", "adam", "line-search", "normalized")
# the step size each strategy takes when none is given; sgd has none (it needs a table or --lr)
DEFAULT_LR = {"adam": 1e-3, "line-search": 1.0, "normalized": 1.0}

LR_SCHEDULES = ("constant", "cosine")

LossAt = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(STRATEGIES)}")


def check_lr_schedule(name: str) -> None:
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")


def scheduled_lr(base: float, schedule: str, step: int, total: int) -> float:
    """The step size of step ``step`` (0-based) of a run of ``total`` steps: ``base`` (constant), or
    base (1 + cos(pi step / total)) / 2 (cosine: from base at the first step towards 0 at the last)."""
    check_lr_schedule(schedule)
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, base: float, schedule: str, step: int, total: int) -> None:
    """Set every parameter group's step size to :func:`scheduled_lr` before step ``step``."""
    lr = scheduled_lr(base, schedule, step, total)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"the learning rate must be a finite number > 0, got {lr!r}")


class NormalizedSGD(torch.optim.Optimizer):
    r"""Normalized gradient steps of decaying length.

    x_{t+1} = x_t - lr / sqrt(t + 1) * g_t / |g_t|, t = 0, 1, ..., with |g_t| the norm over all
    parameters of all groups (one direction for the whole model). A zero gradient takes no step.
    Each step moves the parameters by exactly lr / sqrt(t + 1), whatever the scale of g.

    Example::

        opt = NormalizedSGD(model.parameters(), lr=1.0)
        fg.fill_grad(model, loss_fn); opt.step()
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = DEFAULT_LR["normalized"]) -> None:
        _check_lr(lr)
        super().__init__(params, {"lr": lr, "t": 0})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # takes no closure
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])) if grads else 0
        for group in self.param_groups:
            length = group["lr"] / math.sqrt(group["t"] + 1)
            group["t"] += 1
            if float(norm) > 0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-length / float(norm))


class ArmijoLineSearch(torch.optim.Optimizer):
    r"""Backtracking line search along -g with Armijo's sufficient-decrease test, forward passes only.

    With d = -g (g = ``p.grad`` of every parameter) and f the loss as a function of the parameters:

    1. one jvp gives f(x) and the slope s = <grad f(x), d> (exact, forward mode);
    2. trial steps t = grow * t_prev (lr at the first step), then t * shrink, ... until
       f(x + t d) <= f(x) + c t s, at most ``max_evals`` trials; the first that passes is taken.

    If s >= 0 (d is not a descent direction, possible for an estimate) or no trial passes, the
    parameters stay. So f never increases, and it decreases whenever a step is taken. The accepted t
    is kept for the next step. ``step(loss_at)`` needs ``loss_at(tensors)``: the loss at the given
    parameter values (a sequence in the order of the parameters of all groups). Forward passes used
    (the jvp and every trial) are counted in ``param_groups[0]["evaluations"]``.

    Example::

        opt = ArmijoLineSearch([x])
        value, g = fg.value_and_grad(fn, x); x.grad = g
        opt.step(lambda tensors: fn(tensors[0]))
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = DEFAULT_LR["line-search"],
        *,
        c: float = 1e-4,
        shrink: float = 0.5,
        grow: float = 2.0,
        max_evals: int = 30,
    ) -> None:
        _check_lr(lr)
        if not 0 < c < 1:
            raise ValueError(f"the Armijo constant c must be in (0, 1), got {c}")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}")
        if not grow >= 1:
            raise ValueError(f"grow must be >= 1, got {grow}")
        if max_evals < 1:
            raise ValueError(f"max_evals must be >= 1, got {max_evals}")
        defaults = {"lr": lr, "c": c, "shrink": shrink, "grow": grow, "max_evals": max_evals,
                    "step_size": None, "evaluations": 0, "accepted": 0}
        super().__init__(params, defaults)
        if len(self.param_groups) > 1:
            raise ValueError("ArmijoLineSearch takes one parameter group (one step length for all)")

    @torch.no_grad()
    def step(self, closure: LossAt | None = None) -> torch.Tensor:  # type: ignore[override]  # loss_at(params)
        """One line-search step; returns f at the new parameters (f(x) if no step was taken)."""
        if closure is None:
            raise ValueError("the line search needs the loss: call step(loss_at) (see take_step)")
        group = self.param_groups[0]
        params = group["params"]
        primals = tuple(p.detach() for p in params)
        direction = tuple(-p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
        # the stub's return type also counts has_aux's third value
        value, slope = torch.func.jvp(lambda *tensors: closure(tensors), primals, direction)  # type: ignore[misc]
        group["evaluations"] += 1
        t = group["lr"] if group["step_size"] is None else group["step_size"] * group["grow"]
        if not (math.isfinite(float(value)) and float(slope) < 0):
            return value
        for _ in range(group["max_evals"]):
            trial = [x + t * d for x, d in zip(primals, direction, strict=True)]
            trial_value = closure(trial)
            group["evaluations"] += 1
            if float(trial_value) <= float(value) + group["c"] * t * float(slope):
                for p, x in zip(params, trial, strict=True):
                    p.copy_(x)
                group["step_size"], group["accepted"] = t, group["accepted"] + 1
                return trial_value
            t *= group["shrink"]
        group["step_size"] = t  # nothing passed: start the next step from the smallest trial
        return value


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer of strategy ``name`` over ``params``; ``lr`` None takes :data:`DEFAULT_LR`
    (an error for ``sgd``, whose step size must come from a table, a tune or ``--lr``)."""
    check_strategy(name)
    if lr is None:
        if name == "sgd":
            raise ValueError("plain SGD needs a learning rate: give --lr or --lr-table, or use another --optimizer")
        lr = DEFAULT_LR[name]
    _check_lr(lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "line-search":
        return ArmijoLineSearch(params, lr=lr)
    return NormalizedSGD(params, lr=lr)


def take_step(optimizer: torch.optim.Optimizer, loss_at: LossAt) -> None:
    """``optimizer.step``, handing the line search the loss as a function of the parameter values."""
    if isinstance(optimizer, ArmijoLineSearch):
        optimizer.step(loss_at)
    else:
        optimizer.step()


def extra_forward_passes(optimizer: torch.optim.Optimizer) -> int:
    """Forward passes the strategy itself has used so far (line search: jvps + trials; others 0)."""
    return int(optimizer.param_groups[0].get("evaluations", 0)) if isinstance(optimizer, ArmijoLineSearch) else 0


def module_loss_at(model: nn.Module, inputs: tuple, loss_of_output: Callable[[torch.Tensor], torch.Tensor]) -> LossAt:
    """``loss_at(tensors)``: ``loss_of_output(model(*inputs))`` with the parameters replaced by
    ``tensors`` (in the order of ``model.parameters()``). Buffers are copied first, so trial passes
    never change the model's BatchNorm running statistics."""
    names = [name for name, _ in model.named_parameters()]

    def loss_at(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        state = {name: b.clone() for name, b in model.named_buffers()}
        state.update(zip(names, tensors, strict=True))
        return loss_of_output(torch.func.functional_call(model, state, inputs))

    return loss_at
