"""Activity perturbation: a tangent per block output, the weight gradients from block-local products.

The network is cut into blocks (:mod:`frog.activity`); a step runs it once with every block's inputs
detached, recording each block output h_b (B, *features_b) with a graph inside its block only. The
per-sample losses' jvps along tangents placed on the block outputs, d_i = sum_b <dl_i/dh_b, v_b>
(k, B), give per-sample coefficients c (k, B); block b's output gradient is estimated as
ghat_b = V_b^T c / B, and its weight gradient is the block-local product (dh_b/dtheta_b)^T ghat_b.

The tangents are one set shared by the batch (the paper), or per example, masked at inactive ReLU
units, with a :class:`~frog.guesses.GuessSource`'s guesses first (:mod:`frog.per_example`; the
guide "Closing the gap to backprop", docs/guides/closing-the-gap.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .activity import block_labels, blocks_of, check_local, local_graphs, perturbed, shared_by_batch, shared_features
from .checks import check_nonnegative
from .distributed import Communicator
from .engines import RngReplay
from .forward_mode.batchnorm import frozen_running_stats
from .guesses import GuessSource
from .interface import PER_SAMPLE, LossFn, per_sample_losses
from .per_example import Guesses, MaskCheck, check_example_kind, checked_guesses, example_plan
from .solver import Solver
from .tangents import TangentPlan


class ActivityPerturbation:
    """``perturbation="activity"``: ``loss_fn(model)`` returns per-sample losses (B,) (or (B, ...)); one
    tangent per block output.

    Args:
        blocks: the blocks (default: found automatically, :func:`frog.activity.blocks_of`).
        per_example: independent tangents for every example (B x k per block, one k x k projection per
            example) instead of one set shared by the batch.
        relu_mask: zero random tangents at inactive ReLU units (outputs exactly 0 that do not reach the
            block's parameters), guesses included; default: on with ``per_example`` or ``guess``.
        guess: a :class:`frog.guesses.GuessSource`: its per-example guesses of the block outputs' gradients
            become the first L of the k tangents (pass the batch's targets to ``fill_grad``).
        block_local: each random tangent lives in one block (random row j in block j mod L, zero in the
            others), so that its jvp measures that block's gradient alone and the noise of the large
            gradients of some blocks does not leak into the others.
        local_weight: alpha of the hybrid objective L + alpha sum_b L_b (deep supervision): every hidden
            block's output-gradient estimate gains alpha times its (first) guess used as it is, the exact
            gradient of its local loss for :class:`frog.LocalHeads` (as :class:`frog.LocalLearning` uses
            it), beside frog's estimate of the global gradient. 0: frog alone.
    """

    name = "activity"
    loss_contract = PER_SAMPLE

    def __init__(self, blocks: Sequence[nn.Module] | None = None, *, per_example: bool = False,
                 relu_mask: bool | None = None, guess: GuessSource | None = None, block_local: bool = False,
                 local_weight: float = 0.0) -> None:
        if guess is not None and not isinstance(guess, GuessSource):
            raise ValueError(f"guess must be a frog.guesses.GuessSource (e.g. LocalHeads(num_classes)), got "
                             f"{type(guess).__name__}")
        check_nonnegative("local_weight", local_weight)
        if local_weight and guess is None:
            raise ValueError("local_weight adds the guesses used as they are: give a guess source (guess=...)")
        self.blocks, self.guess = blocks, guess
        self.block_local, self.local_weight = bool(block_local), float(local_weight)
        self.per_example = bool(per_example)
        self.relu_mask = bool(per_example or guess is not None) if relu_mask is None else bool(relu_mask)
        self._mask_check = MaskCheck()  # a cache: which blocks' zero outputs are inactive units
        self._warned = False

    @property
    def composes_rows(self) -> bool:
        """Whether the rows are shaped per step (per example, masked, guessed or block-local), not drawn as
        plain samples."""
        return self.per_example or self.relu_mask or self.guess is not None or self.block_local

    def check(self, sampler: str, normalize: bool, communicator: Communicator | None) -> None:
        """ValueError for settings these tangents cannot take (per-example rows are i.i.d., one process)."""
        if self.composes_rows:
            check_example_kind(sampler, normalize)
            if communicator is not None:
                raise ValueError("per_example, relu_mask and guess run on one process: drop the communicator")

    def estimates(self, solver: Solver, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter],
                  targets: Any, communicator: Communicator | None) -> tuple[torch.Tensor, Any]:
        """(the mean loss, (name, estimate) pairs): per-sample coefficients, then each block's weight
        gradient by a vector-Jacobian product inside that block only, (1/B) sum_i (dh_b[i]/dtheta_b)^T g_b[i]
        (summed over the batch for an output without batch dimension, which all samples share)."""
        blocks = blocks_of(model, self.blocks)
        # sim on a plain chain of blocks (an nn.Sequential of blocks only): the true activity gradients come
        # from the same pass, by chaining the block-local backward products from the loss to the first block
        chained = solver.engine.chains_blocks and isinstance(model, nn.Sequential) and blocks == list(model.children())
        replay = RngReplay(next(iter(params.values())).device)  # every pass sees the same dropout masks
        names = {id(p): n for n, p in params.items()}
        labels = block_labels(model, blocks)
        wants_inputs = chained or (self.guess is not None and self.guess.needs_inputs)
        with local_graphs(blocks, wants_inputs, labels, names) as (inputs, outputs):
            losses = per_sample_losses(loss_fn(model))  # the one plain pass: running statistics update here
        shared = _checked_outputs(losses, outputs, labels, names)
        plan, guesses = self._plan(solver, blocks, outputs, shared, losses, targets, labels, inputs)
        if chained:
            jvps = solver.engine.chained(losses, inputs, outputs, plan, solver.rows(communicator))
            coeffs = solver.coefficients(plan, losses, jvps, communicator)
        else:
            replay.reset()
            coeffs = self._forward_mode(solver, model, loss_fn, blocks, outputs, losses.shape[0], plan, communicator)
        scale = 1.0 / losses.shape[0]  # the loss is the mean of the per-sample losses
        direct = [given[0] * (self.local_weight * scale) if given and self.local_weight and b < len(outputs) - 1
                  else None for b, given in enumerate(guesses)]
        estimates = _block_products(plan, coeffs * scale, outputs, shared, params, direct)
        if communicator is not None and communicator.mode == "data":
            estimates = {name: communicator.all_reduce_mean(g) for name, g in estimates.items()}
        return losses.detach().mean(), iter(estimates.items())

    def _forward_mode(self, solver: Solver, model: nn.Module, loss_fn: LossFn, blocks: Sequence[nn.Module],
                      outputs: list[torch.Tensor], batch: int, plan: TangentPlan,
                      communicator: Communicator | None) -> torch.Tensor:
        """The coefficients from the engine's passes with every block output perturbed (no autograd graph
        on the parameters; sim enables its own)."""

        def losses_at(perturbations: dict[str, torch.Tensor]) -> torch.Tensor:
            with perturbed(blocks, list(perturbations.values())):
                return per_sample_losses(loss_fn(model))

        # forward-mode engines perturb every sample by one (features,) tensor (broadcast over the batch, so
        # no k x B copies of the tangents); sim needs per-sample positions, (B, features), to return
        # per-sample gradients
        per_sample = solver.engine.single_pass
        zeros = {f"block{b}": h.new_zeros(plan.layouts[b].stored if not per_sample else (batch, *plan.shapes[b]))
                 for b, h in enumerate(outputs)}
        with frozen_running_stats(freeze=True) as ran, torch.no_grad():
            _, coeffs = solver.measure(losses_at, zeros, plan, communicator=communicator)
        if not per_sample:
            self._warn_coupled_samples(model, ran, solver.engine.name)
        return coeffs

    def _plan(self, solver: Solver, blocks: Sequence[nn.Module], outputs: list[torch.Tensor], shared: list[bool],
              losses: torch.Tensor, targets: Any, labels: list[str], inputs: list[torch.Tensor]
              ) -> tuple[TangentPlan, Guesses]:
        """The step's activity tangents and the guesses among them: the plan of one shared row set (the
        paper), or per-example rows, masked at inactive ReLU units, with the guess source's guesses first
        (:mod:`frog.per_example`)."""
        features = [shared_features(h) if s else h.shape[1:] for h, s in zip(outputs, shared, strict=True)]
        guesses: Guesses = [[] for _ in outputs]
        if not self.composes_rows:
            return solver.plan(features, outputs[0]), guesses
        if self.guess is not None:
            extra = {"inputs": inputs} if self.guess.needs_inputs else {}
            guesses = checked_guesses(self.guess.guesses(outputs, targets, losses, **extra), outputs, shared, labels)
        masks = [self._mask_check.mask(block, h) if self.relu_mask and not s else None
                 for block, h, s in zip(blocks, outputs, shared, strict=True)]
        k = solver.tangents.num_tangents
        drawn = k - sum(len(given) for given in guesses)
        random = None
        if drawn > 0:  # the random rows: this step's seed, as any plan
            batch = losses.shape[0]
            shapes = [f if s or not self.per_example else torch.Size((batch, *f)) for f, s in zip(features, shared, strict=True)]
            random = solver.random_rows(drawn, shapes, outputs[0])
        plan = example_plan(random, k, features, outputs, shared, per_example=self.per_example, masks=masks,
                            guesses=guesses, track_gram=solver.aggregator.method == "project",
                            block_local=self.block_local)
        return plan, guesses

    def _warn_coupled_samples(self, model: nn.Module, ran: Sequence[nn.Module], engine: str) -> None:
        """Warn once that forward-mode activity estimates through batch-statistics BatchNorm (of the model,
        or ``ran`` in the loss outside it) are not the gradient's (docs: Choosing, Engines)."""
        names = {m: name for name, m in model.named_modules()}
        coupled = [name for m, name in names.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and (m.training or m.running_mean is None)]
        coupled += [f"a {type(m).__name__} outside the model" for m in ran if m not in names]
        if coupled and not self._warned:
            self._warned = True
            warnings.warn(f"activity perturbation with engine={engine!r}: BatchNorm in train mode "
                          f"({', '.join(coupled[:3])}{', ...' if len(coupled) > 3 else ''}) couples the samples "
                          "of a batch, so forward-mode activity estimates are not estimates of the gradient; use "
                          "engine='sim' (the paper's estimates), perturbation='weight', or BatchNorm in eval mode",
                          stacklevel=6)


def _checked_outputs(losses: torch.Tensor, outputs: list[torch.Tensor], labels: list[str],
                     names: dict[int, str]) -> list[bool]:
    """Which block outputs are shared by the batch; ValueError for outputs frog cannot use."""
    check_local([losses], outputs, names, "after the last block")
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
    return shared


def _block_products(plan: TangentPlan, coeffs: torch.Tensor, outputs: list[torch.Tensor], shared: list[bool],
                    params: dict[str, nn.Parameter], direct: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Every parameter's estimate: the block outputs' estimates V_b^T c (B, *features) (summed over the batch
    for a shared output), plus ``direct[b]`` where given (the hybrid's local part), taken back to the
    parameters by one call of autograd on the block-local graphs."""
    output_grads = []
    for b, (h, extra) in enumerate(zip(outputs, direct, strict=True)):
        grad = plan.estimate(b, coeffs).movedim(-1, 0).to(h.dtype)  # (B, *features)
        if extra is not None:
            grad = grad + extra.to(h.dtype)
        output_grads.append(grad.sum(0).reshape(h.shape) if shared[b] else grad)
    names = list(params)
    grads = torch.autograd.grad(outputs, [params[n] for n in names], output_grads, allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=False)}
