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
budget); a plan that keeps them holds k x n for the whole step, whatever the engine. Structured
(low-rank) blocks are held as their factors, k r (m + n) numbers, and a Linear, Conv or Embedding
whose weight has them takes them through :mod:`frog.factored`, never as dense tangents; other modules'
factored weights are formed densely for that block only.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch.func import jvp, vmap

from . import factored
from .checks import check_choice, check_int, check_positive
from .errors import ForwardModeError
from .factored import Routes, Users
from .forward_mode.attention import forward_mode_attention
from .forward_mode.batchnorm import forward_mode_batch_norm
from .forward_mode.plain_kernels import forward_mode_kernels
from .layouts import LowRank
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
        if self.cuda_state is not None:  # self.cuda
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


def _device(primals: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(primals.values())).device


@contextmanager
def forward_mode_rules() -> Iterator[None]:
    """frog's own forward-mode rules, routed while the ``jvp`` and ``loop`` engines run:
    ``F.scaled_dot_product_attention`` (which has no jvp rule in PyTorch) goes to
    :mod:`frog.forward_mode.attention`, train-mode ``F.batch_norm`` (whose jvp PyTorch decomposes op by
    op) to :mod:`frog.forward_mode.batchnorm`, and the kernels whose forward mode is missing or differs
    from autograd (oneDNN/cuDNN RNNs, weight norm, EmbeddingBag, Embedding's padding row, CTC loss) to
    :mod:`frog.forward_mode.plain_kernels`."""
    with forward_mode_attention(), forward_mode_batch_norm(), forward_mode_kernels():
        yield


class RoutedPrimals:
    """The primals of one engine call, split by how their tangents enter.

    ``routes``: factored blocks whose every use is a known module (:mod:`frog.factored`): their weights
    stay constant and the layers add their change along the factored tangent; ``free``: all other
    blocks, whose (dense) tangents enter the function directly.
    """

    def __init__(self, primals: dict[str, torch.Tensor], plan: TangentPlan, users: Users | None) -> None:
        self.names = list(primals)
        users = users or {}
        self.routes: Routes = {b: (users[name], cast(LowRank, plan.layouts[b]))  # factored: LowRank
                               for b, name in enumerate(self.names) if plan.layouts[b].factored and users.get(name)}
        self.free = [b for b in range(len(self.names)) if b not in self.routes]
        self.constants = {self.names[b]: primals[self.names[b]] for b in self.routes}
        self.bases: dict[int, torch.Tensor] = {}  # input-span blocks: the basis found while the layer ran

    def tangent_size(self, plan: TangentPlan) -> int:
        """Entries of one tangent as the forward-mode engines hold it: packed factors for routed blocks,
        dense for the rest (per-example blocks: one row per example)."""
        return sum(math.prod(plan.shapes[b]) if plan.layouts[b].factored and b not in self.routes
                   else math.prod(plan.layouts[b].stored) for b in range(len(self.names)))

    def set_bases(self, plan: TangentPlan, bases: Mapping[int, torch.Tensor] | None = None) -> None:
        """Give the plan the basis of every input-span block (found in this call)."""
        for b, basis in (self.bases if bases is None else bases).items():
            plan.set_basis(b, basis)

    def forward_mode(self, fn: Function) -> Callable:
        """fn as a function of (free primals, packed-factor markers) for torch.func.jvp(has_aux=True):
        returns (value, bases found). The markers are zeros whose tangents carry the packed factors."""

        def run(free: dict[str, torch.Tensor], markers: dict[int, torch.Tensor]):
            bases: dict[int, torch.Tensor] = {}
            with factored.forward_rules(self.routes, markers, bases):
                value = fn({**self.constants, **free})
            return value, bases

        return run

    def primal_args(self, primals: dict[str, torch.Tensor], plan: TangentPlan) -> tuple[dict, dict]:
        """(free primals, zero markers) for :meth:`forward_mode`."""
        free = {self.names[b]: primals[self.names[b]] for b in self.free}
        markers = {b: primals[self.names[b]].new_zeros(plan.layouts[b].stored) for b in self.routes}
        return free, markers

    def tangent_args(self, primals: dict[str, torch.Tensor], plan: TangentPlan, rows: Sequence[int]) -> tuple[dict, dict]:
        """The tangents ``rows`` of every block: (free blocks dense, (r, *shape)), routed blocks packed)."""
        free = {self.names[b]: shaped_like(plan.dense(b, rows), primals[self.names[b]]) for b in self.free}
        markers = {b: plan.block(b, rows).to(primals[self.names[b]].dtype) for b in self.routes}
        return free, markers


class Engine(ABC):
    """An engine, carrying its own options. Two declared capabilities:

    - ``single_pass``: it runs ``fn`` exactly once per step (``sim``), so BatchNorm's running statistics
      update in that pass, and per-sample activity positions give per-sample jvps;
    - ``chains_blocks``: :meth:`chained` gives the per-sample activity jvps of a plain chain of blocks
      from the plain pass itself (``sim``: block-local backward products chained from the loss).
    """

    name = ""
    single_pass = False
    chains_blocks = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def chained(self, losses: torch.Tensor, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                plan: TangentPlan, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The per-sample jvps (len(rows), B) of ``losses`` along the block-output tangents of ``plan``, from
        the plain pass that computed them (``chains_blocks`` engines only)."""
        raise NotImplementedError(f"engine {self.name!r} does not chain blocks")

    @abstractmethod
    def __call__(
        self, fn: Function, primals: dict[str, torch.Tensor], plan: TangentPlan, rows: Sequence[int] | None = None,
        users: Users | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (value, jvps) of ``fn`` at ``primals`` along the plan's raw tangents ``rows``
        (default all k; a distributed rank computes its share).

        value: fn's output, () or (B,); jvps: (len(rows), *value.shape). Primals with a leading batch
        dimension beyond their block's shape share one tangent across the batch (:func:`shaped_like`).
        ``users`` (primal name -> the known modules that alone use it as their weight) lets factored
        blocks reach the jvps through those modules without dense tangents (:mod:`frog.factored`).
        """


class JvpEngine(Engine):
    """All k jvps in one ``vmap(jvp)`` pass; the unbatched primal is computed once.

    When the k tangents (as held: dense, or packed factors for routed blocks) would take more than
    ``budget_mb`` megabytes, the rows are split into chunks that fit, one pass per chunk (the primal
    is then computed once per chunk, and the tangents are generated again for the Gram matrix and
    the estimate instead of being kept). ``max_streams`` caps the rows of a chunk: every
    intermediate of the pass is held for each row of its chunk (k tangent streams beside the primal),
    so at most ``max_streams`` streams at a time bound the activation memory, at the cost of
    k / max_streams primal passes (1: the ``loop`` engine's memory).
    """

    name = "jvp"

    def __init__(self, max_streams: int | None = None, budget_mb: float = DEFAULT_TANGENT_BUDGET_MB) -> None:
        self.budget_bytes = budget_bytes(budget_mb)
        check_int("max_streams", max_streams, 1, optional=True)
        self.max_streams = max_streams

    def __repr__(self) -> str:
        return f"JvpEngine(max_streams={self.max_streams}, budget_mb={self.budget_bytes / 2**20:g})"

    def __call__(self, fn, primals, plan, rows=None, users=None):
        split = RoutedPrimals(primals, plan, users)
        wanted = list(range(plan.num_tangents)) if rows is None else list(rows)
        itemsize = next(iter(primals.values())).element_size()
        size = rows_within(self.budget_bytes, len(wanted), split.tangent_size(plan), itemsize)
        size = min(size, self.max_streams or size)
        chunks = [wanted[i:i + size] for i in range(0, len(wanted), size)]
        run, primal_args = split.forward_mode(fn), split.primal_args(primals, plan)

        def one_tangent(free: dict, markers: dict):
            return jvp(run, primal_args, (free, markers), has_aux=True)

        parts = []
        with forward_mode_rules():
            for chunk in chunks:
                tangents = split.tangent_args(primals, plan, chunk)
                values, jvps, bases = vmap(one_tangent, randomness="same")(*tangents)
                del tangents  # freed before the next chunk is drawn: one chunk within the budget at a time
                parts.append(jvps)
        split.set_bases(plan, {b: basis[0] for b, basis in bases.items()})
        return values[0], parts[0] if len(parts) == 1 else torch.cat(parts)


class LoopEngine(Engine):
    """One ``jvp`` pass per tangent (k primal passes); holds one tangent at a time."""

    name = "loop"

    def __call__(self, fn, primals, plan, rows=None, users=None):
        split = RoutedPrimals(primals, plan, users)
        run, primal_args = split.forward_mode(fn), split.primal_args(primals, plan)
        replay = RngReplay(_device(primals))
        jvps = []
        with forward_mode_rules():
            for i in range(plan.num_tangents) if rows is None else rows:
                replay.reset()
                free, markers = split.tangent_args(primals, plan, [i])
                value, derivative, bases = jvp(  # type: ignore[misc]  # has_aux: the stub has no 3-tuple
                    run, primal_args, ({n: t[0] for n, t in free.items()}, {b: t[0] for b, t in markers.items()}),
                    has_aux=True)
                jvps.append(derivative)
        split.set_bases(plan, bases)
        return value, torch.stack(jvps)


class SimEngine(Engine):
    """Exact gradient g by autograd, then d = W g block by block (the paper's "simulation").

    For per-sample outputs (B,) with batched primals, g is the gradient of their sum at each
    sample's position, so d[:, i] = W g_i: the jvps of output i when samples do not interact
    (true unless e.g. BatchNorm in train mode couples them). Factored blocks give
    d_i = sum_r u_ir^T g v_ir / sqrt(r) from the factors; routed ones (weights of known layers) get no
    weight gradient at all: d_i = sum over the layer's output rows of (g_out U_i)(x V_i), from the
    gradient g_out at its output (:func:`frog.factored.gradient_taps`).
    """

    name = "sim"
    single_pass = True
    chains_blocks = True

    def __call__(self, fn, primals, plan, rows=None, users=None):
        split = RoutedPrimals(primals, plan, users)
        # routed weights need no gradient (no m x n weight-gradient products): their jvps come from
        # their layers' output gradients, tapped in the same backward pass
        leaves = {name: p.detach().requires_grad_(b in split.free) for b, (name, p) in enumerate(primals.items())}
        taps: list[tuple[torch.Tensor, list]] = []
        with torch.enable_grad(), factored.basis_hooks(split.routes, split.bases), \
                factored.gradient_taps(split.routes, taps):
            value = fn(leaves)
            if taps and value.dim() != 0:
                raise ValueError("low-rank tangents perturb weights: the function must return one scalar, "
                                 f"got shape {tuple(value.shape)}")
            inputs = [leaves[split.names[b]] for b in split.free] + [anchor for anchor, _ in taps]
            found: Sequence[torch.Tensor | None]
            if value.requires_grad:
                found = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
            else:  # fn does not depend on the primals
                found = (None,) * len(inputs)
        split.set_bases(plan)
        grads: list[torch.Tensor | None] = [None] * len(split.names)
        for b, grad in zip(split.free, found, strict=False):
            grads[b] = grad
        jvps = jvps_from_gradients(plan, grads, value, rows)
        packed = {b: plan.block(b, rows) for b in {record[0] for _, record in taps}}  # once per block, not per call
        for _, (b, site, x, grad) in taps:
            if grad is not None:
                inner = site.inner(x, grad, packed[b].to(grad.dtype), split.bases.get(b))
                jvps += inner.reshape(jvps.shape).to(jvps.dtype)
        return value.detach(), jvps

    def chained(self, losses: torch.Tensor, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                plan: TangentPlan, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Activity perturbation on a chain of blocks, in the pass that computed ``losses`` (B,): the
        activity gradients by chaining block-local backward products (:func:`chained_gradients`),
        then the per-sample jvps (len(rows), B) along the block-output tangents of ``plan``."""
        return jvps_from_gradients(plan, chained_gradients(losses, inputs, outputs), losses.detach(), rows)


def chained_gradients(losses: torch.Tensor, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(sum of losses)/dh_b for each block output h_b (B, ...), by chaining block-local products
    backwards: g_last from the loss, then g_{b-1} = (dh_b/dh_{b-1})^T g_b through block b alone."""
    grads = [torch.empty(0)] * len(outputs)
    (grad,) = torch.autograd.grad(losses.sum(), outputs[-1], retain_graph=True)
    for b in range(len(outputs) - 1, -1, -1):
        grads[b] = grad
        if b > 0:
            (grad,) = torch.autograd.grad(outputs[b], inputs[b], grad, retain_graph=True)
    return grads


def jvps_from_gradients(
    plan: TangentPlan, grads: Sequence[torch.Tensor | None], value: torch.Tensor, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """d = W g summed over blocks: grads[b] is block b's gradient, shaped like the block or
    (B, *block) for B per-sample outputs ``value``; returns (len(rows), *value.shape)."""
    k = plan.num_tangents if rows is None else len(rows)
    jvps = torch.zeros(k, *value.shape, dtype=value.dtype, device=value.device)
    for b, grad in enumerate(grads):
        if grad is not None:
            jvps += plan.inner(b, grad, value.numel(), rows).reshape(jvps.shape).to(jvps.dtype)
    return jvps


class FiniteDifferenceEngine(Engine):
    """Central differences d_i = |w_i| (f(x + h u_i) - f(x - h u_i)) / (2h), u_i = w_i / |w_i|.

    ``step`` is h, the length of the step in parameter space; the truncation error is O(h^2).
    Routed factored blocks move by their layers' outputs (exact: those layers are linear in their weight).
    """

    name = "fd"

    def __init__(self, step: float = 1e-3) -> None:
        check_positive("the fd engine's step", step)
        self.step = float(step)

    def __repr__(self) -> str:
        return f"FiniteDifferenceEngine(step={self.step:g})"

    def __call__(self, fn, primals, plan, rows=None, users=None):
        split = RoutedPrimals(primals, plan, users)
        replay = RngReplay(_device(primals))
        with torch.no_grad():
            with factored.basis_hooks(split.routes, split.bases):
                value = fn(primals)
            split.set_bases(plan)
            jvps = []
            for i in range(plan.num_tangents) if rows is None else rows:
                norm = torch.sqrt(sum(plan.layouts[b].squared_norms(plan.block(b, [i]))[0] for b in range(len(plan.shapes))))
                h = self.step / norm
                free, packed = split.tangent_args(primals, plan, [i])
                moved = [_moved(fn, primals, split, free, packed, sign * h, replay) for sign in (1.0, -1.0)]
                jvps.append(((moved[0].double() - moved[1].double()) / (2 * h)).to(value.dtype))
        return value, torch.stack(jvps)


def _moved(fn: Function, primals: dict[str, torch.Tensor], split: RoutedPrimals, free: dict[str, torch.Tensor],
           packed: dict[int, torch.Tensor], step: torch.Tensor, replay: RngReplay) -> torch.Tensor:
    """fn at the primals moved by ``step`` times one tangent (``free``: dense rows (1, ...); ``packed``:
    routed factors (1, r, m + n)), with the random numbers of the unmoved pass."""
    replay.reset()
    shifted = {name: primals[name] + (step * t[0]).to(t.dtype) for name, t in free.items()}
    with factored.shift_hooks(split.routes, {b: t[0] for b, t in packed.items()}, split.bases, float(step)):
        return fn({**split.constants, **shifted})


def check_scalar(value: torch.Tensor) -> torch.Tensor:
    """``value`` if it is a scalar tensor, else a ValueError that says so."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the function must return a scalar tensor, got {shape}")
    return value


ENGINE_CLASSES: dict[str, type[Engine]] = {"jvp": JvpEngine, "loop": LoopEngine, "sim": SimEngine,
                                           "fd": FiniteDifferenceEngine}


def make_engine(engine: str | Engine, fd_step: float | None = None,
                tangent_budget_mb: float = DEFAULT_TANGENT_BUDGET_MB, max_streams: int | None = None) -> Engine:
    """The engine ``engine``: an :class:`Engine` as it is, or one built from its name (``jvp``, ``loop``,
    ``sim`` or ``fd``). ``fd_step`` (fd only) and ``max_streams`` (jvp only) are the older way to give the
    options that :class:`FiniteDifferenceEngine` and :class:`JvpEngine` now carry; ``tangent_budget_mb``
    bounds the chunks of a jvp engine built here."""
    if isinstance(engine, Engine):
        if fd_step is not None or max_streams is not None:
            raise ValueError(f"the engine {engine!r} carries its own options: drop fd_step and max_streams")
        return engine
    check_choice("engine", engine, ENGINES)
    if max_streams is not None and engine != "jvp":
        raise ValueError(f"max_streams bounds the vectorized passes of engine='jvp', not engine={engine!r} "
                         "(loop runs one stream at a time): drop it or use engine='jvp'")
    if fd_step is not None and engine != "fd":
        raise ValueError(f"fd_step is the step of engine='fd', not engine={engine!r}: drop it or use engine='fd'")
    if engine == "jvp":
        return JvpEngine(max_streams, tangent_budget_mb)
    if engine == "fd":
        return FiniteDifferenceEngine() if fd_step is None else FiniteDifferenceEngine(fd_step)
    return ENGINE_CLASSES[engine]()


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
        if "'Sparse" in message:  # "... with arguments from the 'SparseCPU' backend"
            raise ForwardModeError(
                "a sparse tensor takes part (torch.sparse, torch.spmm): PyTorch's forward mode does not support "
                f"sparse tensors, so engine={engine!r} cannot run this model; make it dense (.to_dense()) or {fix}"
            ) from error
        raise
