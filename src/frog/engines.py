"""Engines: how the k jvps d_i = <grad f, w_i> of a function of named tensors are obtained.

An engine takes ``fn`` (a dict of primal tensors -> scalar tensor), the primals and a
:class:`~frog.tangents.TangentPlan` whose block b belongs to the b-th primal, and returns
``(value, jvps)`` with jvps of shape (k,) for the plan's *raw* tangents.

=======  ===========================================  ========================  ====================
engine   how                                          cost per step             tangent memory
=======  ===========================================  ========================  ====================
jvp      torch.func.jvp under vmap: all k tangents    1 primal + k tangent      k x n, or chunks of
         in one vectorized pass, primal computed once  streams, batched          rows within a budget
loop     torch.func.jvp, one tangent at a time        k primal + k tangent      n (one tangent)
sim      autograd gradient g, then d = W g             1 forward + 1 backward    k x (largest block)
fd       central differences (f(x+hv)-f(x-hv))/(2h)    2k + 1 forwards           n (one tangent)
=======  ===========================================  ========================  ====================

``jvp`` and ``loop`` are true forward mode (no backward pass); ``sim`` gives the same numbers from
the exact gradient (how the paper computed them); ``fd`` needs no forward-mode rules at all.
The memory column is for a plan that does not keep its blocks (tangents beyond the estimator's
budget); a plan that keeps them holds k x n for the whole step, whatever the engine.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.func import jvp, vmap

from .attention import forward_mode_attention
from .errors import ForwardModeError
from .tangents import TangentPlan

Function = Callable[[dict[str, torch.Tensor]], torch.Tensor]
ENGINES = ("jvp", "loop", "sim", "fd")
DEFAULT_TANGENT_BUDGET_MB = 512.0


def budget_bytes(budget_mb: float) -> float:
    """A tangent budget in bytes; ValueError unless ``budget_mb`` > 0."""
    if not budget_mb > 0:
        raise ValueError(f"tangent_budget_mb must be > 0, got {budget_mb}")
    return float(budget_mb) * 2**20


def rows_within(budget: float, num_tangents: int, dimension: int, itemsize: int) -> int:
    """How many of ``num_tangents`` tangent rows of ``dimension`` entries fit ``budget`` bytes (at least 1)."""
    return max(1, min(num_tangents, int(budget // (dimension * itemsize))))


class RngReplay:
    """Lets every pass of a multi-pass engine see the same random numbers (e.g. dropout masks)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def reset(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def shaped_like(rows: torch.Tensor, primal: torch.Tensor) -> torch.Tensor:
    """Tangent rows (r, *shape) for a primal of shape ``shape`` or (B, *shape).

    A primal with a leading batch dimension that the block shape lacks (a block activity) gets the
    same tangent for every sample: the result is then (r, B, *shape), a broadcast view.
    """
    rows = rows.to(primal.dtype)
    if primal.dim() == rows.dim() - 1:
        return rows
    return rows.unsqueeze(1).expand(rows.shape[0], *primal.shape)


def _rows(plan: TangentPlan, names: list[str], row: int, primals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw tangent ``row`` of every block, as a dict shaped like the primals."""
    return {name: shaped_like(plan.block(b, [row]), primals[name])[0] for b, name in enumerate(names)}


def _device(primals: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(primals.values())).device


class Engine(ABC):
    """An engine; ``single_pass`` ones run ``fn`` exactly once per step."""

    name = ""
    single_pass = False

    @abstractmethod
    def __call__(
        self, fn: Function, primals: dict[str, torch.Tensor], plan: TangentPlan, rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (value, jvps) of ``fn`` at ``primals`` along the plan's raw tangents ``rows``
        (default all k; a distributed rank computes its share).

        value: fn's output, () or (B,); jvps: (len(rows), *value.shape). Primals with a leading batch
        dimension beyond their block's shape share one tangent across the batch (:func:`shaped_like`).
        """


class JvpEngine(Engine):
    """All k jvps in one ``vmap(jvp)`` pass; the unbatched primal is computed once.

    When the k x n tangents would take more than ``budget_mb`` megabytes, the rows are split into
    chunks that fit, one pass per chunk (the primal is then computed once per chunk, and the
    tangents are generated again for the Gram matrix and the estimate instead of being kept).
    """

    name = "jvp"

    def __init__(self, budget_mb: float = DEFAULT_TANGENT_BUDGET_MB) -> None:
        self.budget_bytes = budget_bytes(budget_mb)

    def __call__(self, fn, primals, plan, rows=None):
        names = list(primals)
        wanted = list(range(plan.num_tangents)) if rows is None else list(rows)
        itemsize = next(iter(primals.values())).element_size()
        size = rows_within(self.budget_bytes, len(wanted), plan.dimension, itemsize)
        chunks = [rows] if size == len(wanted) else [wanted[i:i + size] for i in range(0, len(wanted), size)]

        def one_tangent(*blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(fn, (primals,), (dict(zip(names, blocks, strict=False)),))

        parts = []
        for chunk in chunks:
            tangents = [shaped_like(plan.block(b, chunk), primals[name]) for b, name in enumerate(names)]
            with forward_mode_attention():  # attention with a jvp rule (F.scaled_dot_product_attention has none)
                values, jvps = vmap(one_tangent, randomness="same")(*tangents)
            del tangents  # freed before the next chunk is drawn: one chunk within the budget at a time
            parts.append(jvps)
        return values[0], parts[0] if len(parts) == 1 else torch.cat(parts)


class LoopEngine(Engine):
    """One ``jvp`` pass per tangent (k primal passes); holds one tangent at a time."""

    name = "loop"

    def __call__(self, fn, primals, plan, rows=None):
        names = list(primals)
        replay = RngReplay(_device(primals))
        jvps = []
        for i in range(plan.num_tangents) if rows is None else rows:
            replay.reset()
            with forward_mode_attention():
                value, derivative = jvp(fn, (primals,), (_rows(plan, names, i, primals),))
            jvps.append(derivative)
        return value, torch.stack(jvps)


class SimEngine(Engine):
    """Exact gradient g by autograd, then d = W g block by block (the paper's "simulation").

    For per-sample outputs (B,) with batched primals, g is the gradient of their sum at each
    sample's position, so d[:, i] = W g_i: the jvps of output i when samples do not interact
    (true unless e.g. BatchNorm in train mode couples them).
    """

    name = "sim"
    single_pass = True

    def __call__(self, fn, primals, plan, rows=None):
        leaves = {name: p.detach().requires_grad_(True) for name, p in primals.items()}
        with torch.enable_grad():
            value = fn(leaves)
            if value.requires_grad:
                grads = torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
            else:  # fn does not depend on the primals
                grads = (None,) * len(leaves)
        return value.detach(), jvps_from_gradients(plan, grads, value, rows)


def jvps_from_gradients(
    plan: TangentPlan, grads: Sequence[torch.Tensor | None], value: torch.Tensor, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """d = W g summed over blocks: grads[b] is block b's gradient, shaped like the block or
    (B, *block) for B per-sample outputs ``value``; returns (len(rows), *value.shape)."""
    k = plan.num_tangents if rows is None else len(rows)
    jvps = torch.zeros(k, *value.shape, dtype=value.dtype, device=value.device)
    for b, grad in enumerate(grads):
        if grad is not None:
            per_sample = grad.reshape(value.numel(), -1).T  # (m, 1) or, for B outputs, (m, B)
            jvps += (plan.block(b, rows).reshape(k, -1).to(grad.dtype) @ per_sample).reshape(jvps.shape)
    return jvps


class FiniteDifferenceEngine(Engine):
    """Central differences d_i = |w_i| (f(x + h u_i) - f(x - h u_i)) / (2h), u_i = w_i / |w_i|.

    ``step`` is h, the length of the step in parameter space; the truncation error is O(h^2).
    """

    name = "fd"

    def __init__(self, step: float = 1e-3) -> None:
        if not step > 0:
            raise ValueError(f"fd_step must be > 0, got {step}")
        self.step = float(step)

    def __call__(self, fn, primals, plan, rows=None):
        names = list(primals)
        replay = RngReplay(_device(primals))
        with torch.no_grad():
            value = fn(primals)
            jvps = []
            for i in range(plan.num_tangents) if rows is None else rows:
                raw = [plan.block(b, [i]) for b in range(len(names))]
                norm = torch.sqrt(sum(r.double().square().sum() for r in raw))
                row = {name: shaped_like(r, primals[name])[0] for name, r in zip(names, raw, strict=False)}
                h = self.step / norm
                replay.reset()
                plus = fn({name: primals[name] + (h * t).to(t.dtype) for name, t in row.items()})
                replay.reset()
                minus = fn({name: primals[name] - (h * t).to(t.dtype) for name, t in row.items()})
                jvps.append(((plus.double() - minus.double()) / (2 * h)).to(value.dtype))
        return value, torch.stack(jvps)


def check_scalar(value: torch.Tensor) -> torch.Tensor:
    """``value`` if it is a scalar tensor, else a ValueError that says so."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the function must return a scalar tensor, got {shape}")
    return value


def make_engine(name: str, fd_step: float = 1e-3, tangent_budget_mb: float = DEFAULT_TANGENT_BUDGET_MB) -> Engine:
    """The engine called ``name`` (``jvp``, ``loop``, ``sim`` or ``fd``)."""
    if name == "jvp":
        return JvpEngine(tangent_budget_mb)
    if name == "loop":
        return LoopEngine()
    if name == "sim":
        return SimEngine()
    if name == "fd":
        return FiniteDifferenceEngine(fd_step)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


_MISSING_RULE = re.compile(r"forward AD with (\S+) that does not support it")


@contextmanager
def explained_forward_mode_errors(engine: str) -> Iterator[None]:
    """Turn PyTorch's forward-mode failures into a :class:`ForwardModeError` that names the fix."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as error:
        message = str(error)
        fix = "use engine='sim' (autograd) or engine='fd' (finite differences, no AD rules needed)"
        missing = _MISSING_RULE.search(message)
        if missing:
            raise ForwardModeError(
                f"the operation {missing.group(1)} has no forward-mode (jvp) rule in PyTorch, so "
                f"engine={engine!r} cannot run it; {fix}"
            ) from error
        if any(hint in message for hint in ("custom autograd.Function", "does not have vmap support", "setup_context")):
            raise ForwardModeError(
                "a custom torch.autograd.Function in the model lacks forward-mode support (torch.func needs "
                "forward() without ctx plus setup_context(), a jvp staticmethod, and for engine='jvp' also "
                f"vmap or generate_vmap_rule=True); {fix}"
            ) from error
        if "mutate a captured Tensor" in message:
            raise ForwardModeError(
                "the model changes a tensor in place during its forward pass (a buffer such as running "
                f"statistics, other than BatchNorm's, which frog handles); engine={engine!r} cannot "
                f"trace that: put that module in eval mode or {fix}"
            ) from error
        raise
