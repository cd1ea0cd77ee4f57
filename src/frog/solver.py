"""One forward-gradient measurement, shared by weight and activity perturbation.

A step of :class:`frog.ForwardGradient` draws a tangent plan for its blocks (:meth:`Solver.plan`), has the
engine compute the jvps d = W grad f along the plan's raw tangents (:meth:`Solver.measure`), gathers the
ranks' shares of d (distributed), checks that the loss and d are finite, and turns d into coefficients
c with the :class:`~frog.aggregation.Aggregator` (:meth:`Solver.coefficients`); the estimate of block b
is then ``plan.estimate(b, c)``. Each measurement advances the call counter of the estimator's
:class:`~frog.interface.StepState`, so the next one draws new tangents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .aggregation import Aggregator
from .distributed import Communicator
from .engines import Engine, Function, explained_forward_mode_errors, rows_within
from .factored import Users
from .interface import StepState, check_finite
from .tangents import TangentPlan, check_rank, stored_size


@dataclass(frozen=True)
class TangentSettings:
    """The sampler of a step's tangents: k rows of ``sampler`` (rank ``rank`` for the structured ones,
    ``normalize``, ``angle``), kept for the whole step when they fit ``budget_bytes``."""

    num_tangents: int
    sampler: str = "normal"
    rank: int = 1
    normalize: bool = False
    angle: float | None = None
    budget_bytes: float = float(512 * 2**20)


class Solver:
    """Plans, measures and aggregates the steps of one estimator (module docstring).

    Args:
        tangents: the sampler's settings.
        engine: how the jvps are computed.
        aggregator: how they become coefficients.
        state: the estimator's seed and call counter (this step's tangents are drawn from them).
    """

    def __init__(self, tangents: TangentSettings, engine: Engine, aggregator: Aggregator, state: StepState) -> None:
        self.tangents, self.engine, self.aggregator, self.state = tangents, engine, aggregator, state
        self._buffers: dict[int, torch.Tensor] = {}  # a cache: memory the jvp engine reuses from step to step

    def plan(self, shapes: Sequence[torch.Size], like: torch.Tensor, names: Sequence[str] | None = None,
             span: Sequence[int] = ()) -> TangentPlan:
        """The tangent plan of the current call for blocks of ``shapes`` (device and dtype of ``like``).

        The plan keeps every generated block (generated once, for the jvps, the Gram matrix and the
        estimate) when all k tangents (as stored: dense, or factors) fit the tangent budget; otherwise
        it generates them again where they are needed and holds k x (largest block) at a time.
        ``names`` name the blocks in errors; ``span``: the input-span blocks.
        """
        t = self.tangents
        check_rank(t.sampler, t.rank, shapes, names)
        size = stored_size(t.sampler, shapes, t.rank)
        keep = rows_within(t.budget_bytes, t.num_tangents, size, like.element_size()) == t.num_tangents
        return TangentPlan(
            t.sampler, t.num_tangents, shapes,
            seed=self.state.seed, step=self.state.calls, device=like.device, dtype=like.dtype,
            normalize=t.normalize, angle=t.angle,
            cache=keep, track_gram=self.aggregator.method == "project",
            buffers=self._buffers if keep else None,
            rank=t.rank, span=span,
        )

    def random_rows(self, count: int, shapes: Sequence[torch.Size], like: torch.Tensor) -> TangentPlan:
        """``count`` rows of the sampler for blocks of ``shapes``, drawn from this call's seed (the random
        activity tangents beside the guesses)."""
        return TangentPlan(self.tangents.sampler, count, shapes, seed=self.state.seed, step=self.state.calls,
                           device=like.device, dtype=like.dtype)

    def measure(self, fn: Function, primals: dict[str, torch.Tensor], plan: TangentPlan, users: Users | None = None,
                communicator: Communicator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the engine and aggregate: ``(value, coefficients)`` on the plan's raw tangents.

        value is fn's output, () or (B,); coefficients are (k,) or (k, B). ``users``: the known modules
        using each weight (factored tangents reach the jvps through them); ``communicator``: this rank
        computes its share of the k jvps (tangent mode) or of the batch (data mode).
        """
        with explained_forward_mode_errors(self.engine.name):
            value, jvps = self.engine(fn, primals, plan, self.rows(communicator), users)
        return value, self.coefficients(plan, value, jvps, communicator)

    def rows(self, communicator: Communicator | None) -> Sequence[int] | None:
        """The tangent rows whose jvps this rank computes (None: all k)."""
        return communicator.rows(self.tangents.num_tangents) if communicator else None

    def coefficients(self, plan: TangentPlan, value: torch.Tensor, jvps: torch.Tensor,
                     communicator: Communicator | None = None) -> torch.Tensor:
        """Gather the ranks' jvps, check them and the loss, return the coefficients, advance the counter."""
        if communicator is not None:
            jvps = communicator.combine_jvps(jvps, self.tangents.num_tangents)
        check_finite(self.state.calls, value, jvps)
        coeffs = self.aggregator(plan, jvps)
        self.state.advance()
        return coeffs
