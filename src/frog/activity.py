"""Block activities of a network: where activity perturbation adds its tangents (SPEC 2, protocol).

A network is cut into blocks (by default the children of an ``nn.Sequential``); block b maps the
previous block's output h_{b-1} to h_b of shape (B, *features_b). Two hook contexts:

- :func:`local_graphs`: runs the model with each block's input detached, recording every h_b, so
  that autograd from h_b reaches only block b's own parameters (the block-local products);
- :func:`perturbed`: adds a tensor z_b (B, *features_b) to each block output, h_b + z_b, so that
  the jvp of the per-sample losses along z is d_i = sum_b <dl_i/dh_b, z_b>.

Mark blocks in your own model by passing ``blocks=[...]`` (modules that each run once per forward
pass and return one tensor), or build it as an ``nn.Sequential`` of blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def blocks_of(model: nn.Module, blocks: Sequence[nn.Module] | None = None) -> list[nn.Module]:
    """The blocks of ``model``: ``blocks`` if given, else the children of an nn.Sequential.

    Raises ValueError when a trainable parameter lies outside every block (it would get no gradient).
    """
    if blocks is None:
        if not isinstance(model, nn.Sequential):
            raise ValueError(
                "activity perturbation needs the model's blocks: build the model as an nn.Sequential of "
                "blocks or pass blocks=[module, ...] to ForwardGradient"
            )
        blocks = list(model.children())
    blocks = list(blocks)
    if not blocks:
        raise ValueError("activity perturbation needs at least one block")
    inside = {id(p) for block in blocks for p in block.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ValueError(f"parameters outside every block get no gradient: {', '.join(outside[:5])}; "
                         "add their modules to a block")
    return blocks


@contextmanager
def local_graphs(
    blocks: Sequence[nn.Module], inputs_require_grad: bool = False
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record each block's input and output h_b (B, *features), with a graph that stops at the
    block input; with ``inputs_require_grad`` the detached inputs are leaves that take gradients."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def detach_inputs(module: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError("each block must take one tensor input (the previous block's output)")
        first = args[0].detach().requires_grad_(inputs_require_grad and args[0].is_floating_point())
        inputs.append(first)
        return (first, *args[1:])

    def record(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            _check_output(index, output)
            outputs.append(output)
        return hook

    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(detach_inputs), block.register_forward_hook(record(i)))]
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != len(blocks):
        raise ValueError(f"each of the {len(blocks)} blocks must run exactly once per forward pass, "
                         f"but {len(outputs)} block outputs were seen")


@contextmanager
def perturbed(blocks: Sequence[nn.Module], perturbations: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the context, block b returns h_b + perturbations[b]."""

    def add(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + perturbations[index]
        return hook

    handles = [block.register_forward_hook(add(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_output(index: int, output: object) -> None:
    if not isinstance(output, torch.Tensor) or output.dim() < 1:
        raise ValueError(f"block {index} must return one tensor of shape (B, ...), got "
                         f"{type(output).__name__ if not isinstance(output, torch.Tensor) else tuple(output.shape)}")
