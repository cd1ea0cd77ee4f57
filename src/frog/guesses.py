"""Guess sources: per-example guesses of each block output's gradient, from local information
(docs/guides/closing-the-gap.md).

A guess gamma_{b,i} of grad_{h_b} l_i (block b's output, example i) becomes one tangent of the
activity perturbation, in block b's part of the global tangent and zero elsewhere; the other tangents
stay random (:mod:`frog.per_example`). frog's projection then takes from the jvps exactly the
true gradient's component along each guess, so a good guess closes most of the gap to backprop and a
bad one costs one tangent. A guess is computed without a backward pass through the network: it may
use the block's output, the targets and the loss's graph after the last block.

- :class:`GuessSource`: the interface, ``guesses(outputs, targets, losses) -> rows``; subclass it to
  plug in your own (a previous step's estimate, momentum).
- :class:`LocalHeads`: a small auxiliary classifier per hidden block (Fournier et al., ICML 2023):
  its local loss's gradient at the block's output is the guess, and its parameters are trained by
  that same local loss with their own optimizer. The last block's guess is the loss's own local
  gradient there, exact (for cross-entropy, softmax - one-hot).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_int, check_positive
from .tangents import derive_seed

# one block's guesses: none, one (B, *features), or several (one tangent each)
GuessEntry = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | None
HEAD_TOKENS = ("mean", "first")


def entry_guesses(entry: GuessEntry) -> list[torch.Tensor]:
    """A block's entry as a list of guesses: [] for None, [g] for one tensor, the tensors of a tuple or list."""
    if entry is None:
        return []
    return list(entry) if isinstance(entry, (tuple, list)) else [entry]  # what a head of a token block reads: the mean over tokens or the first token


class GuessSource(ABC):
    """Gives, per block and example, a guess of the block output's gradient (a tangent direction).

    The estimator calls :meth:`guesses` once per step, after the plain forward pass, and puts the
    guesses first among the k tangents; their length does not matter to frog (each guess row is
    normalized). :class:`frog.LocalLearning` uses them as they are, as the gradient at each block's
    output: there a guess is scaled as the gradient of the sum over the batch of per-sample losses.
    State that a checkpoint must keep goes into :meth:`state_dict`.

    Two optional capabilities:

    - ``streams = True``: :meth:`block_guess` gives block b's guess as soon as block b has run (from
      its output and the targets alone), and :meth:`end_step` closes the step; local learning then
      trains each block inside the forward pass and holds one block's graph at a time.
    - ``needs_inputs = True``: :meth:`guesses` also takes ``inputs``, every block's input as a leaf
      that takes gradients (:class:`TopDown` differentiates the loss at the last block's input).
    """

    streams: bool = False
    needs_inputs: bool = False

    @abstractmethod
    def guesses(self, outputs: Sequence[torch.Tensor], targets: Any, losses: torch.Tensor,
                **kwargs: Any) -> list[GuessEntry]:
        """One entry per block: a guess (B, *features_b) shaped like the block's output h_b, a tuple of
        several (one tangent each), or None for no guess in that block.

        Args:
            outputs: the block outputs h_b of this step's plain pass, (B, *features_b); each has an
                autograd graph back to its block's detached inputs (not across blocks).
            targets: what ``fill_grad(..., targets=...)`` was given (class indices (B,), tokens (B, T)),
                or None.
            losses: the per-sample losses (B,), with their graph back to the last block's output.
            kwargs: ``inputs`` (the blocks' inputs) for a source with ``needs_inputs``.
        """

    def block_guess(self, index: int, output: torch.Tensor, targets: Any) -> torch.Tensor | None:
        """The guess of hidden block ``index`` from its output (B, *features) alone (``streams``)."""
        raise NotImplementedError(f"{type(self).__name__} gives its guesses after the whole pass (streams=False)")

    def end_step(self) -> None:
        """After the step's :meth:`block_guess` calls (``streams``): e.g. the heads' optimizer step."""
        return

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a source without state accepts only an empty one)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)}: "
                             "resume with the guess source that wrote it")


def output_gradient(losses: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """The exact local gradient d(sum_i l_i)/dh of the per-sample losses (B,) at the last block's output
    h (B, *features): a backward pass through what follows the last block only (the loss; blocks' inputs
    are detached). None when the losses do not depend on h."""
    if not (losses.requires_grad and output.requires_grad):
        return None
    (grad,) = torch.autograd.grad(losses.sum(), output, retain_graph=True, allow_unused=True)
    return grad


def head_for(output: torch.Tensor, targets: torch.Tensor, num_classes: int, hidden_channels: int = 0,
             tokens: str = "mean") -> nn.Module:
    """A small classifier of one block output (B, *features) for class targets (B,) or tokens (B, T).

    With ``hidden_channels`` c = 0, pooling and one Linear:

    - (B, F): Linear(F, classes);
    - (B, T, C) with targets (B,): mean over tokens (``tokens="mean"``) or the first token alone
      (``tokens="first"``: a class token, with a LayerNorm first, as a ViT's own classifier),
      Linear(C, classes);
    - (B, T, C) with targets (B, T): Linear(C, classes) per token;
    - (B, C, *spatial) (images): average pooling, Linear(C, classes).

    With c > 0, first a layer to c channels and a ReLU at every position, so that the guess varies over
    the positions (pooling first gives every token or pixel of a block the same guess):

    - (B, F): Linear(F, c), ReLU, Linear(c, classes);
    - (B, T, C): Linear(C, c) per token, ReLU, then as above (for targets (B,), the mean over tokens or
      the first token);
    - (B, C, H, W): a 3 x 3 convolution to c channels, ReLU, average pooling to a 2 x 2 grid,
      Linear(4 c, classes).
    """
    c = hidden_channels
    if output.dim() == 3 and targets.dim() == 1 and tokens == "first":
        return nn.Sequential(_FirstToken(), nn.LayerNorm(output.shape[2]),
                             head_for(output[:, 0], targets, num_classes, c))
    if c and output.dim() == 4:
        return nn.Sequential(nn.Conv2d(output.shape[1], c, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, num_classes))
    if output.dim() in (2, 3):
        features = output.shape[-1]
        layers: list[nn.Module] = [nn.Linear(features, c), nn.ReLU()] if c else []
        if output.dim() == 3 and targets.dim() == 1:
            layers.append(_MeanOver(1))
        layers.append(nn.Linear(c or features, num_classes))
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    return nn.Sequential(_MeanOver(tuple(range(2, output.dim()))), nn.Linear(output.shape[1], num_classes))


class _FirstToken(nn.Module):
    """Tokens (B, T, C) -> the first token (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class _MeanOver(nn.Module):
    """Mean over fixed dimensions (tokens, or the spatial dimensions of images)."""

    def __init__(self, dims: int | tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims)


class LocalHeads(GuessSource):
    r"""Guesses from local auxiliary classifiers: for hidden block b, gamma_b = d/dh_b of
    sum_i CE(head_b(h_{b,i}), y_i); for the last block, the loss's own gradient there (exact).

    Each head (:func:`head_for`: pooling plus one Linear, or a small layer first) is built on the first
    step from the block's output, with weights drawn from ``seed`` and the block's index, and trained by its local loss
    (mean over the batch) with ``torch.optim.SGD(lr=lr, momentum=momentum)`` at every step, before the
    network's own step. Cost per step: each head's forward and its local backward, about
    2 B q_b C + 4 B C_b C multiply-adds (q_b the block's features, C_b its channels, C the classes),
    small beside the network's passes.

    Args:
        num_classes: number of classes (or the vocabulary for token targets (B, T)).
        lr, momentum: the heads' SGD.
        seed: the heads' initial weights.
        exact_output: guess the last block with the loss's exact local gradient (True) or with a head.
        hidden_channels: each head starts with a layer to this many channels and a ReLU at every
            position (a 3 x 3 convolution on images, a Linear per token or feature vector;
            :func:`head_for`); 0: pooling and a Linear only.
        tokens: token blocks (B, T, C) with class targets: the heads read the mean over tokens
            (``"mean"``) or the first token (``"first"``: for networks that classify from a class
            token, as a ViT; the true gradient then lies mostly on that token).

    Example::

        fg = ForwardGradient(16, perturbation="activity", guess=LocalHeads(10))
        fg.fill_grad(model, lambda m: F.cross_entropy(m(x), y, reduction="none"), targets=y)
    """

    streams = True  # a block's guess needs only its output and the targets

    def __init__(self, num_classes: int, lr: float = 0.1, momentum: float = 0.0, seed: int = 0,
                 exact_output: bool = True, hidden_channels: int = 0, tokens: str = "mean") -> None:
        check_int("num_classes", num_classes, 2)
        check_positive("the heads' lr", lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"the heads' momentum must lie in [0, 1), got {momentum}")
        self.num_classes, self.lr, self.momentum, self.seed = num_classes, lr, momentum, seed
        check_int("hidden_channels", hidden_channels, 0)
        if tokens not in HEAD_TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(HEAD_TOKENS)}, got {tokens!r}")
        self.exact_output, self.hidden_channels, self.tokens = exact_output, hidden_channels, tokens
        self.heads: nn.ModuleDict | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded before the heads were built

    def _head(self, index: int, output: torch.Tensor, targets: torch.Tensor) -> nn.Module:
        """Block ``index``'s head, built on its first use with weights drawn from (seed, index)."""
        if self.heads is None:
            self.heads = nn.ModuleDict()
        key = str(index)
        if key not in self.heads:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, index))
                head = head_for(output, targets, self.num_classes, self.hidden_channels, self.tokens)
            if self._pending is not None:  # resumed: this head's weights from the checkpoint
                prefix = f"{key}."
                head.load_state_dict({name[len(prefix):]: value for name, value in self._pending["heads"].items()
                                      if name.startswith(prefix)})
            self.heads[key] = head.to(device=output.device, dtype=output.dtype)
        return self.heads[key]

    def block_guess(self, index: int, output: torch.Tensor, targets: Any) -> torch.Tensor | None:
        """gamma_b = d/dh_b of sum_i l_i, l_i example i's local loss (the mean cross-entropy over its tokens
        for token targets), from one local backward through the head, which also gives the head's
        gradient (of the mean local loss over the batch). None for an output without batch dimension."""
        _check_targets(targets)
        if output.dim() < 2 or output.shape[0] != targets.shape[0]:
            return None
        head = self._head(index, output, targets)
        with torch.enable_grad():
            point = output.detach().requires_grad_(True)
            logits = head(point)
            local = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")
            grads = torch.autograd.grad(local, [point, *head.parameters()])
        for p, g in zip(head.parameters(), grads[1:], strict=True):
            p.grad = g / targets.numel()
        per_example = targets.numel() // targets.shape[0]  # tokens per example: the guess of their mean
        return grads[0] if per_example == 1 else grads[0] / per_example

    def end_step(self) -> None:
        """One SGD step of every head (the optimizer is made after the first step's heads exist)."""
        if self.heads is None or not len(self.heads):
            return
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD(self.heads.parameters(), lr=self.lr, momentum=self.momentum)
            if self._pending is not None:  # resumed: the heads' weights are in; now their optimizer's state
                self.optimizer.load_state_dict(self._pending["optimizer"])
                self._pending = None
        self.optimizer.step()

    def guesses(self, outputs, targets, losses, **kwargs):
        _check_targets(targets)
        last = len(outputs) - 1
        rows: list[torch.Tensor | None] = [None] * len(outputs)
        for b, h in enumerate(outputs):
            if b < last or not self.exact_output:
                rows[b] = self.block_guess(b, h, targets)
        if self.exact_output:
            rows[last] = output_gradient(losses, outputs[last])
        self.end_step()
        return rows

    def state_dict(self) -> dict[str, Any]:
        if self.heads is None or self.optimizer is None:
            return dict(self._pending or {})
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.heads is None or self.optimizer is None:
            self._pending = state
            return
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending = None


def _check_targets(targets: Any) -> None:
    """ValueError unless ``targets`` are integer class targets (B,) or tokens (B, T)."""
    if not isinstance(targets, torch.Tensor) or targets.dim() not in (1, 2) or targets.is_floating_point():
        got = type(targets).__name__ if not isinstance(targets, torch.Tensor) else f"{targets.dtype} {tuple(targets.shape)}"
        raise ValueError("local heads need the class targets of the batch, integer (B,) or tokens (B, T): "
                         f"pass fill_grad(model, loss_fn, targets=y); got {got}")


class TopDown(GuessSource):
    r"""The exact gradient at the top of a residual stream as the guess of every block on that stream.

    In a residual network every block adds to one stream h, so the gradient g_top = dL/dh at the last
    block's input (a backward pass through the last block and the loss alone, exact and local) is close
    to the gradient at each block's output. Every hidden block whose output has the shape of the last
    block's input (B, *features) gets g_top (per example: d/dh of sum_i l_i); the last block gets the
    loss's exact gradient at its output. Blocks of other shapes (a stem before the stream, the stages of
    a ResNet before the last) get ``fallback``'s guess (e.g. :class:`LocalHeads`, whose heads are then
    built and trained for those blocks only), or none.

    ``order=1`` adds the first-order terms of the blocks above: a residual block j maps x_j to
    h_j = x_j + f_j(x_j), so the true gradient at block b's output is
    (I + J_{b+1})^T ... (I + J_{L-1})^T g_top, J_j the Jacobian of block j's branch, and to first order
    g_top + sum_{j > b} J_j^T g_top. Each J_j^T g_top = (dh_j/dx_j)^T g_top - g_top is one backward product
    inside block j alone with the shared vector g_top (no chain through the network: every block's
    product is independent of the others'), for the blocks whose input and output have the stream's shape.

    Example::

        fg = ForwardGradient(16, perturbation="activity", guess=TopDown(LocalHeads(10)))
    """

    needs_inputs = True

    def __init__(self, fallback: GuessSource | None = None, order: int = 0) -> None:
        if fallback is not None and not (isinstance(fallback, GuessSource) and fallback.streams):
            raise ValueError("TopDown's fallback gives guesses block by block: use LocalHeads(num_classes) or None, "
                             f"got {type(fallback).__name__}")
        if order not in (0, 1):
            raise ValueError(f"TopDown's order is 0 (g_top) or 1 (g_top and the blocks' first-order terms), got {order!r}")
        self.fallback, self.order = fallback, order

    def guesses(self, outputs, targets, losses, **kwargs):
        inputs = kwargs.get("inputs")
        last = len(outputs) - 1
        if not inputs or not inputs[last].requires_grad:
            raise ValueError("TopDown needs the last block's input as a leaf that takes gradients (inputs=...)")
        top = inputs[last]
        (stream,) = torch.autograd.grad(losses.sum(), top, retain_graph=True)
        above = self._first_order_terms(outputs, inputs, stream) if self.order else [None] * len(outputs)
        rows: list[GuessEntry] = [None] * len(outputs)
        for b, h in enumerate(outputs[:last]):
            if h.shape == top.shape:
                rows[b] = stream if above[b] is None else stream + above[b]
            elif self.fallback is not None:
                rows[b] = self.fallback.block_guess(b, h, targets)
        rows[last] = output_gradient(losses, outputs[last])
        if self.fallback is not None:
            self.fallback.end_step()
        return rows

    @staticmethod
    def _first_order_terms(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                           stream: torch.Tensor) -> list[torch.Tensor | None]:
        """sum_{b < j < L} J_j^T g_top for each block b (None where the sum is empty)."""
        terms: list[torch.Tensor | None] = [None] * len(outputs)
        total: torch.Tensor | None = None
        for j in range(len(outputs) - 2, -1, -1):  # from the block under the last one down
            terms[j] = total
            x, h = inputs[j], outputs[j]
            if x.requires_grad and x.shape == h.shape == stream.shape and h.requires_grad:
                (back,) = torch.autograd.grad(h, x, stream, retain_graph=True)
                total = back - stream if total is None else total + (back - stream)
        return terms

    def state_dict(self) -> dict[str, Any]:
        return self.fallback.state_dict() if self.fallback is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fallback is not None:
            self.fallback.load_state_dict(state)
        else:
            super().load_state_dict(state)


class Combined(GuessSource):
    """Several guesses per block: each source's guess of a block, one tangent each (a guess equal to one
    already given is dropped). frog's projection then takes, per example, the best combination of them:
    the true gradient's projection onto their span. :class:`frog.LocalLearning` uses a block's first
    guess only.

    Example::

        guess = Combined(TopDown(), LocalHeads(10))   # stream blocks: top-down and head guesses
    """

    def __init__(self, *sources: GuessSource) -> None:
        if not sources or not all(isinstance(s, GuessSource) for s in sources):
            raise ValueError("Combined takes one or more guess sources, e.g. Combined(TopDown(), LocalHeads(10))")
        self.sources = sources
        self.needs_inputs = any(s.needs_inputs for s in sources)

    def guesses(self, outputs, targets, losses, **kwargs):
        per_block: list[list[torch.Tensor]] = [[] for _ in outputs]
        for source in self.sources:
            extra = kwargs if source.needs_inputs else {}
            for given, entry in zip(per_block, source.guesses(outputs, targets, losses, **extra), strict=True):
                given.extend(g for g in entry_guesses(entry) if not any(g is old or torch.equal(g, old) for old in given))
        return [tuple(given) if given else None for given in per_block]

    def state_dict(self) -> dict[str, Any]:
        return {str(i): source.state_dict() for i, source in enumerate(self.sources)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, source in enumerate(self.sources):
            source.load_state_dict(state.get(str(i), {}))


class SplitGuesses(GuessSource):
    """Each of ``source``'s guesses cut into ``pieces`` parts along its features (flattened per example,
    contiguous runs; for tokens (B, T, C): runs of tokens), one tangent each, zero outside its part.

    frog's projection then fits one coefficient per part instead of one per guess,
    c_{b,p} = <g_{b,p}, gamma_{b,p}> / |gamma_{b,p}|^2, so it corrects how the guess's length is spread over
    the features: the span holds the whole guess, so the estimate is at least as close to the true gradient
    as with the whole guess (and exact as the parts become single features). A block's direct use (local
    learning) is the whole guess: use ``source`` itself there.
    """

    def __init__(self, source: GuessSource, pieces: int) -> None:
        if not isinstance(source, GuessSource):
            raise ValueError(f"SplitGuesses splits a guess source's guesses, got {type(source).__name__}")
        check_int("pieces", pieces, 1)
        self.source, self.pieces, self.needs_inputs = source, pieces, source.needs_inputs

    def guesses(self, outputs, targets, losses, **kwargs):
        rows: list[GuessEntry] = []
        for entry in self.source.guesses(outputs, targets, losses, **kwargs):
            parts = [part for guess in entry_guesses(entry) for part in self._split(guess)]
            rows.append(tuple(parts) if parts else None)
        return rows

    def _split(self, guess: torch.Tensor) -> list[torch.Tensor]:
        flat = guess.flatten(1)
        bounds = torch.linspace(0, flat.shape[1], min(self.pieces, flat.shape[1]) + 1).round().long().tolist()
        parts = []
        for start, stop in itertools.pairwise(bounds):
            part = torch.zeros_like(flat)
            part[:, start:stop] = flat[:, start:stop]
            parts.append(part.reshape(guess.shape))
        return parts

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
