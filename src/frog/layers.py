"""Known layers carry factored weight tangents without forming them (SPEC 4, DESIGN "Structured blocks").

For a Linear, Conv or Embedding whose weight W (viewed as m x n, :func:`~frog.layouts.matrix_shape`)
has the tangent U^T V (U: (r, m), already divided by sqrt(r); V: (r, n)), the layer's output changes by

- Linear    y = x W^T + b:       dy = (x V^T) U                     O(B (m + n) r) instead of O(B m n)
- ConvNd    y = conv(x, W) + b:  dy = sum_r U_r conv(x, V_r)        (V_r as a one-channel kernel)
- Embedding y = W[idx]:          dy = U^T[idx] V                     (zero at padding_idx, as autograd)

The engines add this change through forward hooks while the weight itself takes no tangent: to the
output's tangent under ``jvp`` and ``loop`` (:func:`tangent_hooks`), to its value times +-h under
``fd`` (:func:`shift_hooks`). Input-span tangents (right factors V = rho Q^T, Q an orthonormal basis
of the layer's inputs in the batch, or of its input patches for a convolution) get Q from the layer's
input while it runs (:func:`basis_hooks`, and :func:`tangent_hooks` in forward mode).

:func:`weight_users` finds the known modules that use each weight; :func:`check_uses` runs the model
once and keeps only the weights that nothing else touches (others fall back to dense tangents).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layouts import LowRank

_KNOWN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def known(module: nn.Module) -> bool:
    """Whether frog can add a factored weight tangent to ``module``'s output: a Linear, ungrouped
    Conv1d/2d/3d or Embedding (without max_norm) that runs the stock forward."""
    for cls in _KNOWN:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            if isinstance(module, nn.Embedding):
                return module.max_norm is None
            return getattr(module, "groups", 1) == 1
    return False


def sees_inputs(module: nn.Module) -> bool:
    """Whether frog can find the span of ``module``'s inputs (input-span tangents): a Linear, or a
    Conv1d/Conv2d with zero padding given in numbers."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def weight_users(model: nn.Module, names: Mapping[int, str]) -> dict[str, list[nn.Module]]:
    """name -> the known modules holding that parameter (``names``: id(parameter) -> name) as their
    ``weight``; a weight held by any module frog does not know is left out (it gets dense tangents)."""
    users: dict[str, list[nn.Module | None]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in names:
            users.setdefault(names[id(weight)], []).append(module if known(module) else None)
    return {name: modules for name, modules in users.items() if None not in modules}  # type: ignore[misc]


class _UseRecorder(TorchFunctionMode):
    """Records the weights in ``watched`` (id -> name) that a torch function receives while the
    innermost running module is not one of their users."""

    def __init__(self, watched: dict[int, str], users: dict[str, list[nn.Module]], running: list[nn.Module]) -> None:
        super().__init__()
        self.watched, self.running = watched, running
        self.user_ids = {name: {id(m) for m in modules} for name, modules in users.items()}
        self.elsewhere: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            name = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is not None and not (self.running and id(self.running[-1]) in self.user_ids[name]):
                self.elsewhere.add(name)
        return func(*args, **kwargs)


def check_uses(model: nn.Module, run: Callable[[], object], params: Mapping[str, torch.Tensor],
               users: dict[str, list[nn.Module]]) -> dict[str, list[nn.Module]]:
    """``users`` without the weights that ``run()`` (one forward pass of ``model``) uses outside their
    known modules, e.g. a weight tied into a hand-written matmul or read by nn.MultiheadAttention:
    forward hooks would miss such a use, so those weights keep dense tangents."""
    running: list[nn.Module] = []

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        running.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, a: running.append(m)))
        handles.append(module.register_forward_hook(leave))
    recorder = _UseRecorder({id(params[name]): name for name in users}, users, running)
    try:
        with recorder:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: modules for name, modules in users.items() if name not in recorder.elsewhere}


class Site:
    """One known module using a factored weight block: computes its output change and input basis."""

    def __init__(self, module: nn.Module, layout: LowRank) -> None:
        self.module, self.layout = module, layout

    def change(self, x: torch.Tensor, packed: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        """The output change along the weight tangent stored in ``packed`` (r, m + n), whose right
        half holds V (no basis) or its coordinates rho in ``basis`` (n, d): shaped like the output."""
        layout, module = self.layout, self.module
        left = layout.left(packed)  # (r, m)
        right = packed[..., layout.m:]
        if basis is not None:
            right = right[..., : basis.shape[1]] @ basis.T
        if isinstance(module, nn.Linear):
            return (x @ right.mT) @ left
        if isinstance(module, nn.Embedding):
            rows = F.embedding(x, left.mT)  # (..., r): U^T[idx]
            if module.padding_idx is not None:
                rows = rows * (x != module.padding_idx).unsqueeze(-1).to(rows.dtype)
            return rows @ right
        kernel = right.reshape(layout.rank, *layout.shape[1:])  # (r, in, *kernel)
        responses = module._conv_forward(x, kernel, None)  # (B, r, *spatial)
        return (responses.movedim(1, -1) @ left).movedim(-1, 1)

    def input_rows(self, x: torch.Tensor, output: torch.Tensor) -> int:
        """How many input vectors (rows of x, or input patches) the weight met in this call."""
        if isinstance(self.module, nn.Linear):
            return x.numel() // self.layout.n
        return output.numel() // self.layout.m  # batch x output positions

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """Q (n, d): orthonormal columns spanning the layer's inputs (Linear) or input patches (Conv),
        d = min(rows, n), by a reduced QR of the (n x rows) input matrix."""
        module = self.module
        if isinstance(module, nn.Linear):
            inputs = x.reshape(-1, self.layout.n)
        else:
            two_d = isinstance(module, nn.Conv2d)
            if x.dim() == (3 if two_d else 2):  # an unbatched input
                x = x.unsqueeze(0)
            pair = (lambda v: tuple(v)) if two_d else (lambda v: (1, v[0]))
            patches = F.unfold(x if two_d else x.unsqueeze(-2), pair(module.kernel_size), dilation=pair(module.dilation),
                               padding=pair(module.padding) if two_d else (0, module.padding[0]),
                               stride=pair(module.stride))  # (B, n, L)
            inputs = patches.transpose(1, 2).reshape(-1, self.layout.n)
        q, _ = torch.linalg.qr(inputs.T)
        return q


class _AddTangent(torch.autograd.Function):
    """Identity on a layer's output y, whose tangent gains the site's change along the weight tangent
    carried by the tangent of ``packed`` (primal zeros, (r, m + n)): dy += site.change(x, d packed)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output, x, packed, basis, site):
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1], inputs[3])
        ctx.site = inputs[4]

    @staticmethod
    def jvp(ctx, d_output, d_x, d_packed, d_basis, d_site):
        x, basis = ctx.saved_tensors
        change = ctx.site.change(x, d_packed, basis)
        return change if d_output is None else d_output + change

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("frog's factored weight tangents are forward mode only")


class _AddSpanTangent(torch.autograd.Function):
    """As :class:`_AddTangent` for input-span tangents: also returns the basis Q of the layer's inputs,
    computed from the primal input (once, not per tangent), which the right factor uses."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output, x, packed, site):
        return output.view_as(output), site.basis(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(inputs[1], output[1])
        ctx.site = inputs[3]

    @staticmethod
    def jvp(ctx, d_output, d_x, d_packed, d_site):
        x, basis = ctx.saved_tensors
        change = ctx.site.change(x, d_packed, basis)
        return (change if d_output is None else d_output + change), None

    @staticmethod
    def backward(ctx, grad, grad_basis):
        raise RuntimeError("frog's factored weight tangents are forward mode only")


Routes = Mapping[int, tuple[Sequence[nn.Module], LowRank]]  # block -> (modules using it, its layout)


@contextmanager
def _hooks(routes: Routes, on_output: Callable[[int, Site, torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, every module of ``routes`` returns on_output(block, site, x, output)."""

    def hook(block: int, site: Site):
        def add(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            return on_output(block, site, x, output)
        return add

    handles = [module.register_forward_hook(hook(b, Site(module, layout)), with_kwargs=True)
               for b, (modules, layout) in routes.items() for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def tangent_hooks(routes: Routes, packed: Mapping[int, torch.Tensor], bases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward mode: each routed module's output tangent gains its weight tangent's change, carried by
    the tangent of ``packed[b]`` (primal zeros). Input-span blocks find their basis at their first call
    (stored in ``bases``; later calls of the same weight reuse it); when the layer met at least n
    inputs the span is the whole space and the block stays plain low rank (no entry)."""

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if site.layout.span and b not in bases and site.input_rows(x, output) < site.layout.n:
            output, bases[b] = _AddSpanTangent.apply(output, x, packed[b], site)
            return output
        return _AddTangent.apply(output, x, packed[b], bases.get(b), site)

    with _hooks(routes, on_output):
        yield


@contextmanager
def basis_hooks(routes: Routes, bases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the input basis of every input-span block at its first call (as :func:`tangent_hooks`)."""

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if site.layout.span and b not in bases and site.input_rows(x, output) < site.layout.n:
            bases[b] = site.basis(x.detach())
        return output

    with _hooks(routes, on_output):
        yield


@contextmanager
def shift_hooks(routes: Routes, packed: Mapping[int, torch.Tensor], bases: Mapping[int, torch.Tensor],
                step: float) -> Iterator[None]:
    """Each routed module returns y + step * change: its output with the weight moved by step times
    the tangent in ``packed[b]`` (exact, the layers being linear in their weight)."""

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output + step * site.change(x, packed[b].to(output.dtype), bases.get(b))

    with _hooks(routes, on_output):
        yield
