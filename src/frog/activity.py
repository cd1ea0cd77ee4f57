"""Block activities of a network: where activity perturbation, the paper's choice for networks, adds its tangents
(docs/guides/choosing.md, "Perturbation" and "Blocks").

A network is cut into blocks; block b computes an output h_b, of shape (B, *features_b) for an
output per sample or (*features_b) for one shared by the batch (a position embedding (T, C) that
broadcasts over the batch). Two hook contexts:

- :func:`local_graphs`: runs the model with every tensor input of every block detached, recording
  every h_b, so that autograd from h_b reaches only block b's own parameters (the block-local products);
- :func:`perturbed`: adds a tensor z_b to each block output, h_b + z_b (z_b (features_b) shared by
  the batch, or (B, *features_b) per sample), so that the jvp of the per-sample losses along z is
  d_i = sum_b <dl_i/dh_b, z_b>.

Which modules are blocks (:func:`blocks_of`, shown by :func:`describe_blocks`):

- ``blocks=[...]`` when given;
- the children of an ``nn.Sequential`` that own trainable parameters (the paper's networks,
  :mod:`frog.training.models`);
- otherwise found automatically: the model's children that own trainable parameters, in order,
  with containers opened: an ``nn.ModuleList`` / ``nn.ModuleDict`` always (they are never called
  themselves), an ``nn.Sequential`` when it is a list of at least two modules of one class (a stack
  of transformer or residual blocks), and a module without parameters of its own that has such a
  container among its children (``nn.TransformerEncoder``, a GPT body holding its block list).
  Parameter-free children (dropout, activations) are glue.

A block may take any positional and keyword arguments (masks, position ids) and may return a tuple
(the tangent goes on its first tensor); it must run exactly once per forward pass. Parameters tied
between blocks (an output layer sharing the token embedding's weight) get the sum of both blocks'
contributions. An output counts as per sample when its leading size is the batch size B, else as
shared by the batch (:func:`shared_by_batch`): a shared output whose leading size happens to equal
B (a position embedding (T, C) with T = B) is taken for a per-sample one, so keep B != T there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def blocks_of(model: nn.Module, blocks: Sequence[nn.Module] | None = None) -> list[nn.Module]:
    """The blocks of ``model``: ``blocks`` if given, else the children of an nn.Sequential that own
    trainable parameters, else the blocks found automatically (module docstring).

    Raises ValueError, naming the module or parameter, when no blocks can be found, when a trainable
    parameter lies outside every block (it would get no gradient) or when one block contains another.
    """
    if blocks is None:
        blocks = [c for c in model.children() if _trainable(c)] if isinstance(model, nn.Sequential) \
            else _find_blocks(model)
    blocks = list(blocks)
    if not blocks:
        raise ValueError("activity perturbation needs at least one block")
    names = module_names(model)
    inside = {id(p) for block in blocks for p in block.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ValueError(f"parameters outside every block get no gradient: {', '.join(outside[:5])}; "
                         "add their modules to a block (blocks=[...]) or move them into a submodule")
    for block in blocks:
        for other in blocks:
            if other is not block and any(m is other for m in block.modules()):
                raise ValueError(f"block {names.get(id(block), type(block).__name__)!r} contains block "
                                 f"{names.get(id(other), type(other).__name__)!r}; blocks must not nest")
    return blocks


def stacks_opened(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` (:func:`blocks_of`, found automatically) with every stack among them (an
    nn.Sequential of at least two modules of one class: a ResNet stage of BasicBlocks) opened into its
    modules, so that each of those is a block of its own."""
    opened: list[nn.Module] = []
    for block in blocks_of(model):
        opened.extend((c for c in block.children() if _trainable(c)) if _is_stack(block) else [block])
    return opened


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _is_stack(module: nn.Module) -> bool:
    """An nn.Sequential of at least two modules of one class (e.g. transformer blocks)."""
    kinds = {type(child) for child in module.children()}
    return isinstance(module, nn.Sequential) and len(module) >= 2 and len(kinds) == 1


def _holds_blocks(module: nn.Module) -> bool:
    """A wrapper of a list of blocks: no parameters of its own and a container or stack among its
    children (nn.TransformerEncoder and its ``layers``, a GPT body and its ``h``)."""
    return not any(True for _ in module.parameters(recurse=False)) and \
        any(isinstance(child, _CONTAINERS) or _is_stack(child) for child in module.children())


def _find_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of ``model`` that own trainable parameters, with containers, stacks and wrappers
    of them opened."""
    own = [name for name, p in model.named_parameters(recurse=False) if p.requires_grad]
    if own:
        raise ValueError(
            f"cannot find blocks for activity perturbation in {type(model).__name__}: its parameters "
            f"{', '.join(own[:5])} belong to the model itself, not to a submodule; move them into a submodule "
            "(e.g. an nn.Embedding or a small nn.Module), pass blocks=[module, ...], or use perturbation='weight'"
        )
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if not _trainable(child):
                continue
            if isinstance(child, _CONTAINERS) or _is_stack(child) or _holds_blocks(child):
                visit(child)
            else:
                found.append(child)

    visit(model)
    if not found:
        raise ValueError(f"cannot find blocks for activity perturbation in {type(model).__name__}: "
                         "it has no submodule with trainable parameters; pass blocks=[module, ...]")
    return found


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> qualified name inside ``model`` ("" for the model itself)."""
    return {id(module): name for name, module in model.named_modules()}


def block_labels(model: nn.Module, blocks: Sequence[nn.Module]) -> list[str]:
    """How errors name the blocks: "block 'layers.0'" (qualified names inside ``model``)."""
    names = module_names(model)
    return [f"block {names.get(id(b), type(b).__name__)!r}" for b in blocks]


def describe_blocks(model: nn.Module, blocks: Sequence[nn.Module] | None = None) -> str:
    """A table of the blocks activity perturbation uses for ``model`` (same rules as ForwardGradient):
    index, qualified name, class, number of trainable parameters, and parameters shared with
    other blocks (tied weights)."""
    chosen = blocks_of(model, blocks)
    names = module_names(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, list[int]] = {}
    for b, block in enumerate(chosen):
        for p in block.parameters():
            owners.setdefault(id(p), []).append(b)
    lines = [f"{len(chosen)} blocks of {type(model).__name__} (a tangent on each block's output):"]
    for b, block in enumerate(chosen):
        count = sum(p.numel() for p in block.parameters() if p.requires_grad)
        tied = sorted({f"{param_names.get(id(p), '?')} with block {o}" for p in block.parameters()
                       for o in owners[id(p)] if o != b})
        name = names.get(id(block), "?") or "(model)"
        lines.append(f"  {b}: {name} ({type(block).__name__}, {count:,} parameters)"
                     + (f"; shares {', '.join(tied)}" if tied else ""))
    return "\n".join(lines)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a block's output carries its tangent on: the output, a tuple's first element, or a
    mapping's first value (a Hugging Face ``ModelOutput``'s ``last_hidden_state``)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, Mapping) and output:
        output = next(iter(output.values()))
    return output if isinstance(output, torch.Tensor) else None


def with_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with :func:`first_tensor` replaced by ``tensor`` (same type: tuple, named tuple, list,
    dict or ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, (tuple, list)):
        return _rebuilt(output, [tensor, *output[1:]])
    rebuilt = copy.copy(output)  # a mapping: a dict, an OrderedDict or a dataclass-like ModelOutput
    rebuilt[next(iter(output))] = tensor
    return rebuilt


def _detached(value: Any, first: list[torch.Tensor], requires_grad: bool) -> Any:
    """``value`` with every tensor (inside tuples, lists and dicts) detached; the first one is
    appended to ``first`` (a leaf that takes gradients when ``requires_grad``)."""
    if isinstance(value, torch.Tensor):
        out = value.detach()
        if not first:
            out.requires_grad_(requires_grad and out.is_floating_point())
            first.append(out)
        return out
    if isinstance(value, (tuple, list)):
        return _rebuilt(value, [_detached(v, first, requires_grad) for v in value])
    if isinstance(value, dict):
        return {key: _detached(v, first, requires_grad) for key, v in value.items()}
    return value


def _rebuilt(sequence: tuple | list, items: list) -> tuple | list:
    """``items`` in a sequence of ``sequence``'s type (a tuple, a named tuple or a list)."""
    return type(sequence)(*items) if hasattr(sequence, "_fields") else type(sequence)(items)


def check_local(tensors: Sequence[torch.Tensor], stops: Sequence[torch.Tensor], parameters: dict[int, str],
                where: str) -> None:
    """ValueError naming the parameter when the autograd graph of ``tensors`` reaches a trainable
    parameter other than through the block outputs ``stops``: that use of it (e.g. a weight used
    outside its module, ``x @ emb.weight.T``) would get no gradient from the block-local products."""
    seen = {id(t.grad_fn) for t in stops if t.grad_fn is not None}
    todo: list[Node | None] = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that takes gradients
        if variable is not None and id(variable) in parameters:
            raise ValueError(f"parameter {parameters[id(variable)]!r} is used outside its block ({where}); "
                             "activity perturbation computes each block's gradient from its output only: "
                             "use it through a module that is a block (blocks=[...]) or use perturbation='weight'")
        todo.extend(next_node for next_node, _ in node.next_functions)


@contextmanager
def local_graphs(
    blocks: Sequence[nn.Module],
    inputs_require_grad: bool = False,
    names: Sequence[str] | None = None,
    parameters: dict[int, str] | None = None,
    on_output: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record each block's first tensor input and its output h_b (:func:`first_tensor`), with a
    graph that stops at the block's inputs (all of them are detached); with ``inputs_require_grad``
    the first input is a leaf that takes gradients. ``names`` name the blocks in errors; with
    ``parameters`` (id -> name) every block's inputs are checked by :func:`check_local`.
    ``on_output(b, h_b)``, called as block b returns, may give a tensor that replaces h_b (in the
    forward pass and in the record): local learning trains block b there and returns h_b detached, so
    that block b's graph is freed before the next block runs."""
    names = list(names) if names is not None else [f"block {b} ({type(m).__name__})" for b, m in enumerate(blocks)]
    index_of = {id(block): b for b, block in enumerate(blocks)}
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    runs = [0] * len(blocks)

    def detach_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        index = index_of[id(module)]
        if runs[index]:  # before check_local: a second call's inputs come from the first (an RNN cell in a loop)
            raise ValueError(f"{names[index]} ran twice in one forward pass; every block must run exactly "
                             "once: pass blocks=[...] without it, or a module that contains both calls")
        if parameters:
            check_local(_tensors((args, kwargs)), outputs, parameters, f"in the input of {names[index]}")
        first: list[torch.Tensor] = []
        args, kwargs = _detached(args, first, inputs_require_grad), _detached(kwargs, first, inputs_require_grad)
        inputs.append(first[0] if first else torch.empty(0))
        return args, kwargs

    def record(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            runs[index] += 1
            h = check_output(names[index], output)
            replaced = on_output(index, h) if on_output is not None else None
            outputs.append(h if replaced is None else replaced)
            return None if replaced is None else with_first_tensor(output, replaced)
        return hook

    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(detach_inputs, with_kwargs=True),
                         block.register_forward_hook(record(i)))]
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()
    missing = [names[i] for i, count in enumerate(runs) if count == 0]
    if missing:
        raise ValueError(f"{', '.join(missing)} did not run in the forward pass; every block must run exactly once "
                         "per forward pass: freeze the parameters of an unused module (requires_grad_(False)) or "
                         "pass blocks=[...]")


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@contextmanager
def perturbed(blocks: Sequence[nn.Module], perturbations: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the context, block b returns h_b + perturbations[b] (on the first tensor of a tuple)."""

    def add(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            h = first_tensor(output)
            assert h is not None, f"block {index} returned no tensor"  # check_output saw one when it was recorded
            return with_first_tensor(output, h + perturbations[index])
        return hook

    handles = [block.register_forward_hook(add(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shared_by_batch(output: torch.Tensor, batch_size: int) -> bool:
    """Whether a block output has no batch dimension (its leading size is not the batch size B):
    one value for all samples, broadcast over the batch, like a position embedding (T, C) or (1, T, C)."""
    return output.dim() == 0 or output.shape[0] != batch_size


def shared_features(output: torch.Tensor) -> torch.Size:
    """The shape of the tangent of an output without batch dimension: its shape, less a leading 1 that
    broadcasts over the batch ((1, T, C) -> (T, C), so that per-sample positions (B, T, C) fit it)."""
    return output.shape[1:] if output.dim() > 1 and output.shape[0] == 1 else output.shape


def check_output(name: str, output: Any) -> torch.Tensor:
    """The block output's tensor (:func:`first_tensor`), or a ValueError naming the block."""
    tensor = first_tensor(output)
    if tensor is None or not tensor.is_floating_point():
        got = type(output).__name__ if tensor is None else f"a {tensor.dtype} tensor"
        raise ValueError(f"{name} must return a floating-point tensor (or a tuple whose first element is one) "
                         f"to carry a tangent, got {got}; pass blocks=[...] without it")
    return tensor
