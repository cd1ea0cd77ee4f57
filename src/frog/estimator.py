"""ForwardGradient: sampler + engine + aggregation, for plain functions and nn.Modules."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import layers
from .activity import (
    block_labels,
    blocks_of,
    check_local,
    local_graphs,
    perturbed,
    shared_by_batch,
    shared_features,
)
from .aggregation import check_method, coefficients, scale_correction
from .distributed import Communicator, unwrap_replicas
from .engines import (
    DEFAULT_TANGENT_BUDGET_MB,
    Function,
    RngReplay,
    budget_bytes,
    check_scalar,
    explained_forward_mode_errors,
    make_engine,
    rows_within,
)
from .example_tangents import MaskCheck, check_example_kind, checked_guesses, example_plan
from .forward_mode.batchnorm import frozen_running_stats
from .forward_mode.masks import same_masks
from .forward_mode.plain_kernels import plain_checkpoints
from .guesses import GuessSource
from .interface import PER_SAMPLE, SCALAR, GradientEstimator, StepEstimates, check_finite, per_sample_losses
from .layers import Users
from .tangents import STRUCTURED, TangentPlan, check_kind, check_rank, mean_squared_norm, stored_size

PERTURBATIONS = ("weight", "activity")


class _LossOf(nn.Module):
    """Wraps ``loss_fn(model)`` as a module so torch.func.functional_call can swap its tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model)


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
        tangents: ``normal``, ``rademacher``, ``basis``, ``orthonormal``, ``angle``, or the structured
            ``lowrank`` (every weight of 2+ dimensions, viewed as a matrix, gets tangents U_i V_i^T /
            sqrt(rank): k rank (m + n) random numbers instead of k m n; Linear, Conv and Embedding
            layers take them without dense tangents) and ``input-span`` (low rank, with the right
            factors of Linear and Conv weights drawn in the span of the layer's inputs in the batch;
            weight perturbation only). Vectors (biases) keep dense N(0, 1) rows.
        rank: r of the structured tangents.
        engine: ``jvp``, ``loop``, ``sim`` or ``fd`` (see :mod:`frog.engines`).
        seed: tangents of call t depend only on (seed, t, tangent, block).
        normalize: divide each tangent by its norm.
        angle: degrees in (0, 90], for ``tangents="angle"``.
        scale_correction: multiply by the authors' length correction (SPEC 1, "Length"), so that the
            estimate has the gradient's expected length instead of about sqrt(k/n) of it (frog:
            E[chi_n] / E[chi_k]). On by default: optimizers are tuned for gradient-sized numbers
            (epsilons of Adadelta, Adagrad, RMSprop and Adam; SGD's step size and weight decay;
            gradient clipping), and with the plain projection they take steps about sqrt(k/n) times
            too short or none at all. ``False`` gives the paper's plain estimators, as its experiments
            (``frog train``, ``frog optimize``, ``frog reproduce``) use them.
        fd_step: step length h of the ``fd`` engine.
        tangent_budget_mb: memory the tangents may take. When all k tangents fit (k x n entries, or
            the factors of structured tangents), they are generated once
            per step and kept; otherwise they are generated block by block where they are needed
            (twice or three times a step) and the ``jvp`` engine runs its passes on chunks of
            tangents that fit: slower, with memory bounded by the budget.
        rtol: eigenvalue cut-off of the Gram solve for rank-deficient tangents.
        perturbation: what :meth:`fill_grad` perturbs: ``weight`` (a tangent per parameter tensor)
            or ``activity`` (a tangent per block output, shared by the batch, as in the paper).
        per_example: activity perturbation with independent tangents for every example (B x k per
            block, one k x k projection per example) instead of one set shared by the batch (SPEC 5).
        relu_mask: zero random activity tangents at inactive ReLU units (outputs exactly 0 that do not
            reach the block's parameters), guesses included; default: on with ``per_example`` or ``guess``
            (:mod:`frog.example_tangents`).
        guess: a :class:`frog.guesses.GuessSource` (e.g. :class:`frog.guesses.LocalHeads`): its per-example
            guesses of the block outputs' gradients become the first L of the k activity tangents, the
            other k - L stay random; pass the batch's targets to :meth:`fill_grad`. The length correction
            is not applied to it (the guessed components have the gradient's length).
        blocks: the blocks for activity perturbation (default: found automatically, see
            :func:`frog.activity.blocks_of`; :func:`frog.describe_blocks` shows them).
        communicator: a :class:`frog.distributed.Communicator` to share the work between ranks.
        max_streams: ``engine="jvp"`` runs at most this many tangent streams in one vectorized pass
            (default: all k that fit the tangent budget). Each stream holds its own copy of every
            intermediate, so k streams take about k times inference's activation memory; fewer streams
            take less memory and more primal passes (:class:`frog.engines.JvpEngine`).
    """

    def __init__(
        self,
        num_tangents: int = 1,
        aggregation: str = "project",
        tangents: str = "normal",
        engine: str = "jvp",
        seed: int = 0,
        *,
        normalize: bool = False,
        angle: float | None = None,
        scale_correction: bool = True,
        fd_step: float = 1e-3,
        tangent_budget_mb: float = DEFAULT_TANGENT_BUDGET_MB,
        rtol: float | None = None,
        perturbation: str = "weight",
        blocks: Sequence[nn.Module] | None = None,
        communicator: Communicator | None = None,
        rank: int = 1,
        per_example: bool = False,
        relu_mask: bool | None = None,
        guess: GuessSource | None = None,
        max_streams: int | None = None,
    ) -> None:
        if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
            raise ValueError(f"num_tangents must be an integer >= 1, got {num_tangents!r}")
        check_method(aggregation)
        check_kind(tangents, angle)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")
        check_rank(tangents, rank, ())
        if tangents in STRUCTURED and perturbation == "activity":
            raise ValueError(f"tangents={tangents!r} structures weight tangents, but perturbation='activity' "
                             "perturbs block outputs: use perturbation='weight' (or tangents='normal')")
        if tangents == "input-span" and communicator is not None and communicator.mode == "data":
            raise ValueError("input-span tangents depend on the batch, which differs between the ranks in "
                             "distributed data mode: use the tangent mode (--distributed tangent) or tangents='lowrank'")
        relu_mask = (per_example or guess is not None) if relu_mask is None else relu_mask
        if per_example or relu_mask or guess is not None:
            if perturbation != "activity":
                raise ValueError("per_example, relu_mask and guess shape activity tangents: use perturbation='activity'")
            check_example_kind(tangents, normalize)
            if communicator is not None:
                raise ValueError("per_example, relu_mask and guess run on one process: drop the communicator")
        if guess is not None and not isinstance(guess, GuessSource):
            raise ValueError(f"guess must be a frog.guesses.GuessSource (e.g. LocalHeads(num_classes)), got "
                             f"{type(guess).__name__}")
        self.per_example, self.relu_mask, self.guess = bool(per_example), bool(relu_mask), guess
        self._mask_check = MaskCheck()
        self.num_tangents = num_tangents
        self.aggregation = aggregation
        self.tangents = tangents
        self.tangent_budget_bytes = budget_bytes(tangent_budget_mb)
        self.engine = make_engine(engine, fd_step, tangent_budget_mb, max_streams)
        self.seed = seed
        self.normalize = normalize
        self.angle = angle
        self.scale_correction = scale_correction
        self.rtol = rtol
        self.perturbation = perturbation
        self.loss_contract = PER_SAMPLE if perturbation == "activity" else SCALAR
        self.blocks = blocks
        self.communicator = communicator
        self.rank = rank
        self.calls = 0
        self._tangent_buffers: dict[int, torch.Tensor] = {}  # reused by the jvp engine, step to step
        # model -> (its parameters' ids, the known modules using each weight), checked on first use
        self._users: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Users]] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()
        self._held = False  # within same_tangents(): the call counter stays put

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`calls` (the number of estimates made so far)."""
        warnings.warn("ForwardGradient.step is deprecated: it is the call counter, now named calls", DeprecationWarning,
                      stacklevel=2)
        return self.calls

    def __repr__(self) -> str:
        guess_on = self.guess is not None
        extras = [f"rank={self.rank}"] if self.tangents in STRUCTURED else []
        extras += ["per_example=True"] if self.per_example else []
        extras += [f"relu_mask={self.relu_mask}"] if self.relu_mask != (self.per_example or guess_on) else []
        extras += [f"guess={type(self.guess).__name__}"] if guess_on else []
        return (
            f"ForwardGradient(num_tangents={self.num_tangents}, aggregation={self.aggregation!r}, "
            f"tangents={self.tangents!r}, engine={self.engine.name!r}, seed={self.seed}, step={self.calls}"
            + "".join(f", {e}" for e in extras) + ")"
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue with the same tangents: seed and call counter, and the
        guess source's state (heads and their optimizer)."""
        state: dict[str, Any] = {"seed": self.seed, "step": self.calls}
        if self.guess is not None:
            state["guess"] = self.guess.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["step"])
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
        if self._held:
            raise RuntimeError("same_tangents() is already active for this estimator")
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.calls += 1

    # -- core --------------------------------------------------------------------------------
    def plan(self, shapes: Sequence[torch.Size], like: torch.Tensor, names: Sequence[str] | None = None,
             span: Sequence[int] = ()) -> TangentPlan:
        """The tangent plan of the current call for blocks of ``shapes`` (device and dtype of ``like``).

        The plan keeps every generated block (generated once, for the jvps, the Gram matrix and the
        estimate) when all k tangents (as stored: dense, or factors) fit the tangent budget; otherwise
        it generates them again where they are needed and holds k x (largest block) at a time.
        ``names`` name the blocks in errors; ``span``: the input-span blocks.
        """
        check_rank(self.tangents, self.rank, shapes, names)
        k = self.num_tangents
        size = stored_size(self.tangents, shapes, self.rank)
        keep = rows_within(self.tangent_budget_bytes, k, size, like.element_size()) == k
        return TangentPlan(
            self.tangents, self.num_tangents, shapes,
            seed=self.seed, step=self.calls, device=like.device, dtype=like.dtype,
            normalize=self.normalize, angle=self.angle,
            cache=keep, track_gram=self.aggregation == "project",
            buffers=self._tangent_buffers if keep else None,
            rank=self.rank, span=span,
        )

    def coefficients(self, plan: TangentPlan, raw_jvps: torch.Tensor) -> torch.Tensor:
        """Coefficients c_W (k,) or (k, B) on the plan's raw tangents: estimate = W^T c_W.

        With tangents V = T W: d_V = T d_W, G_V = T G_W T^T, c_V from the aggregation, c_W = T^T c_V.
        """
        transform = plan.transform()
        jvps = raw_jvps if transform is None else (transform @ raw_jvps.double()).to(raw_jvps.dtype)
        gram = None
        if self.aggregation == "project":
            gram = plan.gram() if transform is None else transform @ plan.gram() @ transform.T
        coeffs = coefficients(gram, jvps, self.aggregation, rtol=self.rtol)
        # no correction with guesses (their components have the gradient's length); input-span tangents
        # span less than n: the gradient lies in that space
        if self.scale_correction and self.guess is None:
            n = plan.spanned_dimension()
            mean_sq = mean_squared_norm(self.tangents, self.normalize, n)
            coeffs = coeffs * scale_correction(self.aggregation, self.num_tangents, n, mean_sq)
        if transform is not None:
            coeffs = (transform.T @ coeffs.double()).to(coeffs.dtype)
        return coeffs

    def coefficients_of(
        self, fn: Function, primals: dict[str, torch.Tensor], plan: TangentPlan, users: Users | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the engine and aggregate: ``(value, coefficients)`` on the plan's raw tangents.

        value is fn's output, () or (B,); coefficients are (k,) or (k, B). Checks that the loss and
        the jvps are finite, then advances the call counter (the next call draws new tangents).
        ``users``: the known modules using each weight (factored tangents reach the jvps through them).
        """
        comm = self.communicator
        with explained_forward_mode_errors(self.engine.name):
            value, jvps = self.engine(fn, primals, plan, comm.rows(self.num_tangents) if comm else None, users)
        return value, self._aggregate(plan, value, jvps)

    def _aggregate(self, plan: TangentPlan, value: torch.Tensor, jvps: torch.Tensor) -> torch.Tensor:
        """Gather the ranks' jvps, check them, return the coefficients and advance the counter."""
        comm = self.communicator
        if comm is not None:
            jvps = comm.combine_jvps(jvps, self.num_tangents)
        check_finite(self.calls, value, jvps)
        coeffs = self.coefficients(plan, jvps)
        if not self._held:
            self.calls += 1
        return coeffs

    def estimate(
        self, fn: Function, primals: dict[str, torch.Tensor], users: Users | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Value of scalar ``fn`` and the forward-gradient estimate for each named primal (same shapes).

        ``users``: primal name -> the known modules that alone use it as their weight (weight
        perturbation with structured tangents; :meth:`weight_users`). With ``input-span`` tangents a
        weight used by exactly one module that frog sees the inputs of gets right factors in the span
        of those inputs, every other matrix plain low rank (warned once).
        """
        value, plan, coeffs = self._solve(fn, primals, users)
        estimates = {name: plan.estimate(b, coeffs).to(tensor.dtype) for b, (name, tensor) in enumerate(primals.items())}
        return value, estimates

    def _solve(
        self, fn: Function, primals: dict[str, torch.Tensor], users: Users | None = None
    ) -> tuple[torch.Tensor, TangentPlan, torch.Tensor]:
        """(value, plan, coefficients (k,)) of scalar ``fn``: the estimate of block b is ``plan.estimate(b, c)``."""
        names = list(primals)
        users = users or {}
        span = [b for b, name in enumerate(names) if self.tangents == "input-span" and primals[name].dim() >= 2
                and len(users.get(name, ())) == 1 and layers.sees_inputs(users[name][0])]
        if self.tangents == "input-span":
            self._warn_low_rank([name for b, name in enumerate(names) if primals[name].dim() >= 2 and b not in span])
        plan = self.plan([p.shape for p in primals.values()], next(iter(primals.values())), names, span)
        value, coeffs = self.coefficients_of(lambda p: check_scalar(fn(p)), primals, plan, users)
        return value, plan, coeffs

    def _warn_low_rank(self, names: list[str]) -> None:
        """Warn once per name that an input-span estimator gives these matrices plain low-rank tangents."""
        new = [name for name in names if name not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"input-span tangents: frog cannot see the inputs of {', '.join(new)} (not the weight of "
                          "one Linear or Conv layer that runs its own forward), so they get lowrank tangents",
                          stacklevel=4)

    def _warn_coupled_samples(self, model: nn.Module, ran: Sequence[nn.Module]) -> None:
        """Warn once that forward-mode activity estimates through batch-statistics BatchNorm (of the model,
        or ``ran`` in the loss outside it) are not the gradient's (README, Engines: the coupling transposed)."""
        names = {m: name for name, m in model.named_modules()}
        coupled = [name for m, name in names.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and (m.training or m.running_mean is None)]
        coupled += [f"a {type(m).__name__} outside the model" for m in ran if m not in names]
        if coupled and "coupled" not in self._warned:
            self._warned.add("coupled")
            warnings.warn(f"activity perturbation with engine={self.engine.name!r}: BatchNorm in train mode "
                          f"({', '.join(coupled[:3])}{', ...' if len(coupled) > 3 else ''}) couples the samples "
                          "of a batch, so forward-mode activity estimates are not estimates of the gradient; use "
                          "engine='sim' (the paper's estimates), perturbation='weight', or BatchNorm in eval mode",
                          stacklevel=4)

    # -- plain functions ---------------------------------------------------------------------
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

    # -- modules -----------------------------------------------------------------------------
    def estimates(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], *, targets: Any = None,
                  release_grads: bool = False) -> StepEstimates:
        """The forward-gradient estimate of every trainable parameter.

        Weight perturbation: one tangent block per parameter tensor, generated from the seed
        block by block (the Gram matrix is accumulated over the blocks); ``loss_fn(model)`` returns
        a scalar loss, and each parameter's estimate V_b^T c is formed from the step's coefficients c
        (k numbers) when its pair is taken, so :meth:`update` holds one parameter's estimate at a time,
        never n numbers. Activity perturbation: one tangent per block output, shared by the batch;
        ``loss_fn(model)`` returns per-sample losses (B,) and the loss is their mean; the weight
        estimates come from the blocks' local products together. BatchNorm running statistics are
        updated exactly once per call. ``targets`` (the batch's labels) go to the guess source.

        For momentum, Adam or weight decay use :meth:`fill_grad` and a ``torch.optim`` optimizer: that
        keeps ``p.grad`` (n numbers) and the optimizer's state (Adam: 2 n).
        """
        value, params, pairs = self._estimates(model, loss_fn, targets, free_grads=release_grads)
        return StepEstimates(value, params, pairs)

    def _estimates(
        self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], targets: Any, free_grads: bool
    ) -> tuple[torch.Tensor, dict[str, nn.Parameter], Iterator[tuple[str, torch.Tensor]]]:
        """(loss, trainable parameters by name, (name, estimate) pairs). Weight perturbation forms each
        estimate when the pair is taken; ``free_grads`` drops ``p.grad`` before the passes."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model, replicas = unwrap_replicas(model)
        if replicas is not None and self.communicator is None:  # DDP over several ranks: average as DDP does
            self.communicator = replicas
            try:
                return self._estimates(model, loss_fn, targets, free_grads)
            finally:
                self.communicator = None
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no parameters with requires_grad=True")
        if free_grads:  # replaced: free the old gradients before the estimates are built
            for p in params.values():
                p.grad = None
        with same_masks(), plain_checkpoints():  # every pass drops the same units; checkpoints run plainly
            if self.perturbation == "activity":
                value, estimates = self._activity_estimates(model, loss_fn, params, targets)
                comm = self.communicator
                if comm is not None and comm.mode == "data":
                    estimates = {name: comm.all_reduce_mean(g) for name, g in estimates.items()}
                return value, params, iter(estimates.items())
            value, plan, coeffs = self._weight_solve(model, loss_fn, params)
        lazy = ((name, plan.estimate(b, coeffs).to(p.dtype)) for b, (name, p) in enumerate(params.items()))
        return value, params, lazy

    def _weight_solve(self, model, loss_fn, params) -> tuple[torch.Tensor, TangentPlan, torch.Tensor]:
        """Weight perturbation: (loss, plan, coefficients); running statistics updated once."""
        wrapper = _LossOf(model, loss_fn)

        def loss_at(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(wrapper, {f"model.{n}": t for n, t in tensors.items()}, (), strict=False)

        users = self.weight_users(model, loss_fn, params) if self.tangents in STRUCTURED else None
        with frozen_running_stats(freeze=not self.engine.single_pass) as frozen:
            value, plan, coeffs = self._solve(loss_at, {n: p.detach() for n, p in params.items()}, users)
        if frozen:
            with torch.no_grad():
                loss_fn(model)  # one plain pass updates the running statistics once
        return value, plan, coeffs

    def weight_users(self, model: nn.Module, loss_fn, params: dict[str, torch.Tensor]) -> Users:
        """The known modules (Linear, Conv, Embedding) using each weight of ``model``, for structured tangents.

        On the first call for a model (and again when its parameters change), one plain pass without
        gradients (running statistics and random numbers left as they were) checks that each such
        weight is used by its modules only; weights used anywhere else get dense tangents.
        """
        key = tuple(id(p) for p in params.values())
        cached = self._users.get(model)
        if cached is None or cached[0] != key:
            candidates = layers.weight_users(model, {id(p): name for name, p in params.items()})
            replay = RngReplay(next(iter(params.values())).device)
            with frozen_running_stats(freeze=True), torch.no_grad():
                users = layers.check_uses(model, lambda: loss_fn(model), params, candidates)
            replay.reset()
            cached = self._users[model] = (key, users)
        return cached[1]

    def _activity_estimates(self, model, loss_fn, params, targets=None):
        """Activity perturbation: per-sample jvps (k, B) of the losses along one tangent per block
        output (shared by the batch, or per example with guesses first: :meth:`_activity_plan`),
        per-sample coefficients, then each block's weight gradient by
        a vector-Jacobian product inside that block only: (1/B) sum_i (dh_b[i]/dtheta_b)^T g_b[i]
        (summed over the batch for an output without batch dimension, which all samples share)."""
        blocks = blocks_of(model, self.blocks)
        # sim on a plain chain of blocks (an nn.Sequential of blocks only): the true activity gradients come
        # from the same pass, by chaining the block-local backward products from the loss to the first block
        chained_sim = self.engine.single_pass and isinstance(model, nn.Sequential) and blocks == list(model.children())
        replay = RngReplay(next(iter(params.values())).device)  # every pass sees the same dropout masks
        parameter_names = {id(p): n for n, p in params.items()}
        labels = block_labels(model, blocks)
        wants_inputs = chained_sim or (self.guess is not None and self.guess.needs_inputs)
        with local_graphs(blocks, wants_inputs, labels, parameter_names) as (inputs, outputs):
            losses = per_sample_losses(loss_fn(model))  # the one plain pass: running statistics update here
        check_local([losses], outputs, parameter_names, "after the last block")
        untracked = [label for label, h in zip(labels, outputs, strict=True) if not h.requires_grad]
        if untracked:
            raise ValueError(f"{', '.join(untracked)} returned an output without autograd graph (computed under "
                             "torch.no_grad() or detached), so activity perturbation cannot reach its parameters: "
                             "freeze them (requires_grad_(False)) or pass blocks=[...] without that module")
        batch = losses.shape[0]
        shared = [shared_by_batch(h, batch) for h in outputs]
        if all(shared):
            shapes = ", ".join(str(tuple(h.shape)) for h in outputs[:4]) + (", ..." if len(outputs) > 4 else "")
            raise ValueError(f"with perturbation='activity' the per-sample losses ({batch},) must share their leading "
                             f"size, the batch, with the blocks' outputs, but no block output starts with {batch} "
                             f"(outputs {shapes}); return per-sample losses (B,) or (B, ...) of a batch-first model, "
                             "or use perturbation='weight'")
        features = [shared_features(h) if s else h.shape[1:] for h, s in zip(outputs, shared, strict=True)]
        plan = self._activity_plan(blocks, features, outputs, shared, losses, targets, labels, inputs)
        comm = self.communicator
        if chained_sim:
            rows = comm.rows(self.num_tangents) if comm else None
            chained = self.engine.chained  # type: ignore[attr-defined]  # chained_sim: the sim engine has it
            coeffs = self._aggregate(plan, losses, chained(losses, inputs, outputs, plan, rows))
        else:
            def losses_at(perturbations: dict[str, torch.Tensor]) -> torch.Tensor:
                with perturbed(blocks, list(perturbations.values())):
                    return per_sample_losses(loss_fn(model))

            # forward-mode engines perturb every sample by one (features,) tensor (broadcast over the
            # batch, so no k x B copies of the tangents); sim needs per-sample positions, (B, features),
            # to return per-sample gradients
            per_sample = self.engine.single_pass
            zeros = {f"block{b}": h.new_zeros(plan.layouts[b].stored if not per_sample else (batch, *f))
                     for b, (h, f) in enumerate(zip(outputs, features, strict=True))}
            # no autograd graph on the parameters in the jvp passes (sim enables its own)
            replay.reset()
            with frozen_running_stats(freeze=True) as ran, torch.no_grad():
                _, coeffs = self.coefficients_of(losses_at, zeros, plan)
            if not per_sample:
                self._warn_coupled_samples(model, ran)
        scale = 1.0 / batch  # the loss is the mean of the per-sample losses
        output_grads = []
        for b, h in enumerate(outputs):
            grad = plan.estimate(b, coeffs * scale).movedim(-1, 0).to(h.dtype)  # (B, *features)
            output_grads.append(grad.sum(0).reshape(h.shape) if shared[b] else grad)
        names = list(params)
        grads = torch.autograd.grad(outputs, [params[n] for n in names], output_grads, allow_unused=True)
        estimates = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=False)}
        return losses.detach().mean(), estimates


    def _activity_plan(self, blocks, features, outputs, shared, losses, targets, labels, inputs) -> TangentPlan:
        """The step's activity tangents: the plan of one shared row set (the paper), or per-example rows,
        masked at inactive ReLU units, with the guess source's guesses first (:mod:`frog.example_tangents`)."""
        if not (self.per_example or self.relu_mask or self.guess is not None):
            return self.plan(features, outputs[0])
        guesses: list[torch.Tensor | None] = [None] * len(outputs)
        if self.guess is not None:
            extra = {"inputs": inputs} if self.guess.needs_inputs else {}
            guesses = checked_guesses(self.guess.guesses(outputs, targets, losses, **extra), outputs, shared, labels)
        masks = [self._mask_check.mask(block, h) if self.relu_mask and not s else None
                 for block, h, s in zip(blocks, outputs, shared, strict=True)]
        drawn = self.num_tangents - sum(g is not None for g in guesses)
        random = None
        if drawn > 0:  # the random rows: this step's seed, as any plan
            batch = losses.shape[0]
            shapes = [f if s or not self.per_example else torch.Size((batch, *f)) for f, s in zip(features, shared, strict=True)]
            random = TangentPlan(self.tangents, drawn, shapes, seed=self.seed, step=self.calls, device=outputs[0].device,
                                 dtype=outputs[0].dtype)
        return example_plan(random, self.num_tangents, features, outputs, shared, per_example=self.per_example,
                            masks=masks, guesses=guesses, track_gram=self.aggregation == "project")


