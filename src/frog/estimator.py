"""ForwardGradient: the user-facing settings, their validation and the wiring of a forward-gradient step.

A step is a :class:`~frog.solver.Solver` (tangent plan, engine, aggregation, call counter) driven by one
of two strategies: :class:`~frog.weight_perturbation.WeightPerturbation` (a tangent per parameter tensor)
or :class:`~frog.activity_perturbation.ActivityPerturbation` (a tangent per block output). The estimator
holds the settings and the state; the algorithms live in those modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .activity_perturbation import ActivityPerturbation
from .aggregation import Aggregator, check_method
from .checks import check_choice, check_int
from .distributed import Communicator, unwrap_replicas
from .engines import DEFAULT_TANGENT_BUDGET_MB, Engine, budget_bytes, make_engine
from .factored import Users
from .forward_mode.masks import same_masks
from .forward_mode.plain_kernels import plain_checkpoints
from .guesses import GuessSource
from .interface import GradientEstimator, LossFn, StepEstimates, StepState, release, trainable_parameters
from .solver import Solver, TangentSettings
from .tangents import STRUCTURED, TangentPlan, check_kind, check_rank
from .weight_perturbation import WeightPerturbation

PERTURBATIONS = ("weight", "activity")
Strategy = WeightPerturbation | ActivityPerturbation


class ForwardGradient(GradientEstimator):
    r"""Multi-tangent forward-gradient estimator.

    Each call draws k tangents V = [v_1 .. v_k] (stored k x n) from ``seed`` and the call counter,
    obtains the jvps d = V \nabla f with the chosen ``engine`` (no backward pass for ``jvp``,
    ``loop`` and ``fd``) and returns V^T c with coefficients c from ``aggregation``:
    ``sum`` (c = d), ``mean`` (c = d / k) or ``project`` (G c = d, G = V V^T: the orthogonal
    projection of the gradient onto span(V), "frog").

    Example::

        fg = ForwardGradient(num_tangents=16, aggregation="project", seed=0)
        g = fg.grad(fn, x)                 # fn: Tensor -> scalar; g has x's shape
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = fg.fill_grad(model, lambda m: F.cross_entropy(m(xb), yb))
        opt.step()
        loss = fg.update(model, loss_fn, lr=0.1)   # or plain SGD in place, with no p.grad buffer at all

    Args:
        num_tangents: k >= 1.
        aggregation: ``project`` (frog), ``mean`` or ``sum``.
        sampler: ``normal``, ``rademacher``, ``basis``, ``orthonormal``, ``angle``, or the structured
            ``lowrank`` (every weight of 2+ dimensions, viewed as a matrix, gets tangents U_i V_i^T /
            sqrt(rank): k rank (m + n) random numbers instead of k m n; Linear, Conv and Embedding
            layers take them without dense tangents) and ``input-span`` (low rank, with the right
            factors of Linear and Conv weights drawn in the span of the layer's inputs in the batch;
            weight perturbation only). Vectors (biases) keep dense N(0, 1) rows. (Formerly ``tangents=``.)
        engine: ``jvp``, ``loop``, ``sim`` or ``fd``, or an engine object with its options, such as
            ``JvpEngine(max_streams=4)`` or ``FiniteDifferenceEngine(step=1e-4)`` (:mod:`frog.engines`).
        seed: tangents of call t depend only on (seed, t, tangent, block).
        normalize: divide each tangent by its norm.
        angle: degrees in (0, 90], for ``sampler="angle"``.
        scale_correction: multiply by the authors' length correction (frog: E[chi_n] / E[chi_k],
            :func:`frog.scale_correction`), so that the estimate has the gradient's expected length instead
            of about sqrt(k/n) of it: optimizers are tuned for gradient-sized numbers (Adam's epsilon, SGD's
            step size, weight decay, clipping). ``False`` gives the paper's plain estimators, as its
            experiments (``frog train``, ``frog optimize``, ``frog reproduce``) use them.
        tangent_budget_mb: memory the tangents may take. When all k tangents fit (dense, or the factors of
            structured tangents) they are generated once per step and kept; otherwise they are generated
            block by block where needed and the ``jvp`` engine runs on chunks that fit (slower).
        rtol: eigenvalue cut-off of the Gram solve for rank-deficient tangents.
        perturbation: what :meth:`fill_grad` perturbs: ``weight`` (a tangent per parameter tensor) or
            ``activity`` (a tangent per block output, shared by the batch, as in the paper), or a strategy
            object (:class:`~frog.weight_perturbation.WeightPerturbation`,
            :class:`~frog.activity_perturbation.ActivityPerturbation`) with its own options.
        rank: r of the structured samplers.
        blocks, per_example, relu_mask, guess: the options of activity perturbation
            (:class:`~frog.activity_perturbation.ActivityPerturbation`): the blocks (default: found
            automatically, :func:`frog.describe_blocks`); independent tangents per example; zero tangents at
            inactive ReLU units; a :class:`frog.guesses.GuessSource` whose guesses become the first L of the
            k tangents (pass the batch's targets to :meth:`fill_grad`; the length correction is not applied
            then: the guessed components have the gradient's length).
        communicator: a :class:`frog.distributed.Communicator` to share the work between ranks.
        fd_step, max_streams: deprecated: give ``engine=FiniteDifferenceEngine(step)`` or
            ``engine=JvpEngine(max_streams)``.
    """

    def __init__(self, num_tangents: int = 1, aggregation: str = "project", sampler: str = "normal",
                 engine: str | Engine = "jvp", seed: int = 0, *, normalize: bool = False, angle: float | None = None,
                 scale_correction: bool = True, tangent_budget_mb: float = DEFAULT_TANGENT_BUDGET_MB,
                 rtol: float | None = None, perturbation: str | Strategy = "weight",
                 blocks: Sequence[nn.Module] | None = None, communicator: Communicator | None = None, rank: int = 1,
                 per_example: bool = False, relu_mask: bool | None = None, guess: GuessSource | None = None,
                 tangents: str | None = None, fd_step: float | None = None, max_streams: int | None = None) -> None:
        sampler = _renamed("tangents", tangents, "sampler", sampler, "normal")
        check_int("num_tangents", num_tangents, 1)
        check_method(aggregation)
        check_kind(sampler, angle)
        check_int("seed", seed)
        check_rank(sampler, rank, ())
        self.strategy = _strategy(perturbation, blocks, per_example, relu_mask, guess)
        _check_combination(self.strategy, sampler, normalize, communicator)
        self.loss_contract = self.strategy.loss_contract
        self.state = StepState(seed)
        self.num_tangents, self.aggregation, self.communicator = num_tangents, aggregation, communicator
        self.engine = _engine(engine, fd_step, max_streams, tangent_budget_mb)
        self.aggregator = Aggregator(aggregation, num_tangents, sampler, normalize,
                                     scale_correction and self.guess is None, rtol)
        settings = TangentSettings(num_tangents, sampler, rank, normalize, angle, budget_bytes(tangent_budget_mb))
        self.solver = Solver(settings, self.engine, self.aggregator, self.state)

    # -- settings and state ----------------------------------------------------------------------
    @property
    def perturbation(self) -> str:
        """``weight`` or ``activity``."""
        return self.strategy.name

    @property
    def guess(self) -> GuessSource | None:
        """The guess source of activity perturbation, or None."""
        return self.strategy.guess if isinstance(self.strategy, ActivityPerturbation) else None

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`calls` (the number of estimates made so far)."""
        warnings.warn("ForwardGradient.step is deprecated: it is the call counter, now named calls", DeprecationWarning,
                      stacklevel=2)
        return self.calls

    def __repr__(self) -> str:
        t, activity = self.solver.tangents, self.strategy if isinstance(self.strategy, ActivityPerturbation) else None
        extras = [f"rank={t.rank}"] if t.sampler in STRUCTURED else []
        if activity is not None:
            extras += ["per_example=True"] if activity.per_example else []
            extras += [f"relu_mask={activity.relu_mask}"] if activity.relu_mask != (activity.per_example or
                                                                                    self.guess is not None) else []
            extras += [f"guess={type(self.guess).__name__}"] if self.guess is not None else []
        return (f"ForwardGradient(num_tangents={self.num_tangents}, aggregation={self.aggregation!r}, "
                f"sampler={t.sampler!r}, engine={self.engine.name!r}, seed={self.seed}, calls={self.calls}, "
                f"perturbation={self.perturbation!r}" + "".join(f", {e}" for e in extras) + ")")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue with the same tangents: seed and call counter, and the
        guess source's state (heads and their optimizer)."""
        state: dict[str, Any] = self.state.state_dict()
        if self.guess is not None:
            state["guess"] = self.guess.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        if self.guess is not None:
            self.guess.load_state_dict(state.get("guess", {}))

    @contextmanager
    def same_tangents(self) -> Iterator[None]:
        """Within the context every call draws the same tangents, those of the next call (the counter
        moves on by one at the end). For optimizers that evaluate the loss several times in one step,
        such as ``torch.optim.LBFGS``'s closure or a line search: with new tangents at each evaluation,
        they compare estimates from different random subspaces. ::

            with fg.same_tangents():
                optimizer.step(lambda: fg.fill_grad(model, loss_fn))   # zero_grad is not needed
        """
        if self.state.held:
            raise RuntimeError("same_tangents() is already active for this estimator")
        self.state.held = True
        try:
            yield
        finally:
            self.state.held = False
            self.state.advance()

    # -- plain functions -------------------------------------------------------------------------
    def value_and_grad(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fn(x), estimate)`` for fn: Tensor (any shape) -> scalar; the estimate has x's shape."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError("x must have at least one element")
        value, estimates = self.estimate(lambda p: fn(p["x"]), {"x": x.detach()})
        return value, estimates["x"]

    def grad(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The forward-gradient estimate of grad fn(x), same shape as x."""
        return self.value_and_grad(fn, x)[1]

    def estimate(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], primals: dict[str, torch.Tensor],
                 users: Users | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Value of scalar ``fn`` of named tensors and the estimate for each (same shapes), by weight
        perturbation of the tensors. ``users``: primal name -> the known modules that alone use it as
        their weight (structured tangents; :meth:`weight_users`)."""
        strategy = self.strategy if isinstance(self.strategy, WeightPerturbation) else WeightPerturbation()
        value, plan, coeffs = strategy.solve(self.solver, fn, primals, users, self.communicator)
        return value, {name: plan.estimate(b, coeffs).to(t.dtype) for b, (name, t) in enumerate(primals.items())}

    # -- modules ---------------------------------------------------------------------------------
    def estimates(self, model: nn.Module, loss_fn: LossFn, *, targets: Any = None,
                  release_grads: bool = False) -> StepEstimates:
        """The forward-gradient estimate of every trainable parameter of ``model`` (or the module inside a
        DDP / DataParallel wrapper; DDP over several ranks averages as DDP does). Weight perturbation:
        ``loss_fn(model)`` returns a scalar loss, and each parameter's estimate V_b^T c is formed when its
        pair is taken, so :meth:`update` holds one parameter's estimate at a time. Activity perturbation:
        ``loss_fn(model)`` returns per-sample losses (B,), the loss is their mean, and ``targets`` (the
        batch's labels) go to the guess source. BatchNorm running statistics are updated once per call."""
        model, replicas = unwrap_replicas(model)
        communicator = self.communicator if self.communicator is not None else replicas
        params = trainable_parameters(model)
        if release_grads:
            release(params.values())
        with same_masks(), plain_checkpoints():  # every pass drops the same units; checkpoints run plainly
            value, pairs = self.strategy.estimates(self.solver, model, loss_fn, params, targets, communicator)
        return StepEstimates(value, params, pairs)

    def plan(self, shapes: Sequence[torch.Size], like: torch.Tensor, names: Sequence[str] | None = None,
             span: Sequence[int] = ()) -> TangentPlan:
        """The tangent plan of the current call (:meth:`frog.solver.Solver.plan`)."""
        return self.solver.plan(shapes, like, names, span)

    def weight_users(self, model: nn.Module, loss_fn: LossFn, params: Mapping[str, torch.Tensor]) -> Users:
        """The known modules using each weight (:meth:`frog.weight_perturbation.WeightPerturbation.weight_users`)."""
        strategy = self.strategy if isinstance(self.strategy, WeightPerturbation) else WeightPerturbation()
        return strategy.weight_users(model, loss_fn, params)

    def coefficients(self, plan: TangentPlan, raw_jvps: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``fg.aggregator(plan, raw_jvps)`` (:class:`frog.aggregation.Aggregator`)."""
        warnings.warn("ForwardGradient.coefficients is deprecated: use fg.aggregator(plan, jvps)", DeprecationWarning,
                      stacklevel=2)
        return self.aggregator(plan, raw_jvps)


def _renamed(old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """``new_value``, or ``old_value`` given under the deprecated keyword ``old`` (warned)."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise ValueError(f"give {new}= only ({old}= is its deprecated name)")
    warnings.warn(f"ForwardGradient({old}=...) is deprecated: it is now {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def _engine(engine: str | Engine, fd_step: float | None, max_streams: int | None, budget_mb: float) -> Engine:
    """The engine, with the options that the deprecated keywords fd_step and max_streams give (warned)."""
    for old, value, new in (("fd_step", fd_step, "FiniteDifferenceEngine(step)"),
                            ("max_streams", max_streams, "JvpEngine(max_streams)")):
        if value is not None:
            warnings.warn(f"ForwardGradient({old}=...) is deprecated: pass engine={new}", DeprecationWarning,
                          stacklevel=4)
    return make_engine(engine, fd_step if engine == "fd" else None, budget_mb, max_streams)


def _check_combination(strategy: Strategy, sampler: str, normalize: bool, communicator: Communicator | None) -> None:
    """ValueError for tangents the strategy cannot take."""
    if sampler in STRUCTURED and isinstance(strategy, ActivityPerturbation):
        raise ValueError(f"sampler={sampler!r} structures weight tangents, but perturbation='activity' "
                         "perturbs block outputs: use perturbation='weight' (or sampler='normal')")
    if sampler == "input-span" and communicator is not None and communicator.mode == "data":
        raise ValueError("input-span tangents depend on the batch, which differs between the ranks in "
                         "distributed data mode: use the tangent mode (--distributed tangent) or sampler='lowrank'")
    if isinstance(strategy, ActivityPerturbation):
        strategy.check(sampler, normalize, communicator)


def _strategy(perturbation: str | Strategy, blocks: Sequence[nn.Module] | None, per_example: bool,
              relu_mask: bool | None, guess: GuessSource | None) -> Strategy:
    """The strategy object of ``perturbation``, with the activity options (errors for options it cannot take)."""
    activity_options = blocks is not None or per_example or relu_mask is not None or guess is not None
    if isinstance(perturbation, (WeightPerturbation, ActivityPerturbation)):
        if activity_options:
            raise ValueError("the perturbation object carries its own options: drop blocks, per_example, relu_mask "
                             "and guess (or pass them to ActivityPerturbation)")
        return perturbation
    check_choice("perturbation", perturbation, PERTURBATIONS)
    if perturbation == "weight":
        if per_example or relu_mask or guess is not None:
            raise ValueError("per_example, relu_mask and guess shape activity tangents: use perturbation='activity'")
        return WeightPerturbation()
    return ActivityPerturbation(blocks, per_example=per_example, relu_mask=relu_mask, guess=guess)
