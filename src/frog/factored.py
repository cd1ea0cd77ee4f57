"""Known layers carry factored weight tangents without forming them (docs/guides/structured-tangents.md).

For a Linear, Conv or Embedding whose weight W (viewed as m x n, :func:`~frog.layouts.matrix_shape`)
has the tangent U^T V (U: (r, m), already divided by sqrt(r); V: (r, n)), the layer's output changes by

- Linear    y = x W^T + b:       dy = (x V^T) U                     O(B (m + n) r) instead of O(B m n)
- ConvNd    y = conv(x, W) + b:  dy = sum_r U_r conv(x, V_r)        (V_r as a one-channel kernel)
- Embedding y = W[idx]:          dy = U^T[idx] V                     (zero at padding_idx, as autograd)

The weight itself takes no tangent. Under ``jvp`` and ``loop`` each such module runs as a custom
function whose forward-mode rule adds the change to its output's tangent (:func:`forward_rules`, all
k tangents in one vectorized pass); under ``fd`` a forward hook adds +-h times the change to its
output's value (:func:`shift_hooks`); under ``sim`` a backward pass gives each such module's output
gradient g, and the jvps are sum (g U)(x V) (:func:`gradient_taps`, :meth:`Site.inner`). Input-span tangents (right factors V = rho Q^T, Q an orthonormal
basis of the layer's inputs in the batch, or of its input patches for a convolution) take Q from
the layer's input while it runs (:func:`forward_rules`; :func:`basis_hooks` for ``sim`` and ``fd``).

:func:`weight_users` finds the known modules that use each weight; :func:`check_uses` runs the model
once and keeps only the weights that nothing else touches (others fall back to dense tangents).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .layouts import LowRank

_KNOWN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
Known = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding  # the modules :func:`known` accepts


def known(module: nn.Module) -> bool:
    """Whether frog can add a factored weight tangent to ``module``'s output: a Linear, ungrouped
    Conv1d/2d/3d or Embedding (without max_norm) that runs the stock forward."""
    for cls in _KNOWN:
        if isinstance(module, cls) and type(module).forward is cls.forward and "forward" not in module.__dict__:
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
    """One known module using a factored weight block (``layout``) while an engine runs: its forward,
    its forward-mode rule, the output change along the factored tangent, and its input basis."""

    def __init__(self, module: nn.Module, layout: LowRank) -> None:
        self.module, self.layout = cast(Known, module), layout  # known(module) holds

    # -- the layer and its tangent ---------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The module's own output for these tensors (stock Linear, Conv or Embedding forward)."""
        module = self.module
        if isinstance(module, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(module, nn.Embedding):
            return F.embedding(x, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq,
                               module.sparse)
        return module._conv_forward(x, weight, bias)

    def tangent(self, x: torch.Tensor, weight: torch.Tensor, d_x: torch.Tensor | None, d_weight: torch.Tensor | None,
                d_bias: torch.Tensor | None, d_packed: torch.Tensor | None, basis: torch.Tensor | None,
                shape: torch.Size) -> torch.Tensor:
        """The tangent of the output (of ``shape``): W d_x + d_W x + d_b (for whichever tangents exist;
        no products with zeros) + the change along the factored weight tangent in d_packed."""
        module = self.module
        out = None
        if d_x is not None and x.is_floating_point():
            out = self.forward(d_x, weight, None)
        if d_weight is not None:
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:  # as autograd: no padding row
                d_weight = d_weight.index_fill(0, torch.tensor([module.padding_idx], device=d_weight.device), 0.0)
            moved = _linear_of_tangent(x, d_weight) if isinstance(module, nn.Linear) else self.forward(x, d_weight, None)
            out = moved if out is None else out + moved
        if d_packed is not None:  # fused into the products above where there are any
            out = self.change(x, d_packed, basis, add_to=out)
        if d_bias is not None:
            if not isinstance(module, nn.Linear):  # a convolution: the bias runs along the channel dimension
                d_bias = d_bias.reshape(-1, *[1] * (weight.dim() - 2))
            out = d_bias if out is None else out + d_bias
        return x.new_zeros(shape) if out is None else out.expand(shape)

    def change(self, x: torch.Tensor, packed: torch.Tensor, basis: torch.Tensor | None,
               add_to: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """The output change along ``scale`` times the weight tangent stored in ``packed`` (r, m + n),
        whose right half holds V (no basis) or its coordinates rho in ``basis`` (n, d): shaped like the
        output, added to ``add_to`` when given (one fused pass for rank 1)."""
        left = self.layout.left(packed) * scale if scale != 1.0 else self.layout.left(packed)  # (r, m)
        coefficients, rows, channel = self._expansion(x, left, self._right(packed, basis))
        if channel is not None and add_to is not None:
            add_to = add_to.movedim(channel, -1)
        if self.layout.rank == 1:  # an outer product: broadcasting beats a matmul with inner size 1
            change = coefficients * rows[0] if add_to is None else torch.addcmul(add_to, coefficients, rows[0])
        else:
            change = coefficients @ rows if add_to is None else add_to + coefficients @ rows
        return change if channel is None else change.movedim(-1, channel)

    def inner(self, x: torch.Tensor, grad_output: torch.Tensor, packed: torch.Tensor,
              basis: torch.Tensor | None) -> torch.Tensor:
        """<grad_output, change along tangent i> for the k tangents stored in ``packed`` (k, r, m + n),
        without forming the changes: sum over output positions of (grad . U_i)(input . V_i), (k,).
        With ``grad_output`` the gradient of a loss at this call's output, these are the call's
        share of the k jvps of the loss (O(rows (m + n) k r), no m x n product)."""
        layout = self.layout
        k, kr = packed.shape[0], packed.shape[0] * layout.rank
        left = layout.left(packed).reshape(kr, layout.m)  # U^T / sqrt(r), rows of all tangents
        right = self._right(packed, basis).reshape(kr, layout.n)
        coefficients, rows, channel = self._expansion(x, left, right)  # (..., k r), (k r, features)
        if channel is not None:
            grad_output = grad_output.movedim(channel, -1)
        along = grad_output.reshape(-1, rows.shape[-1]) @ rows.T  # (positions, k r): grad . the combined rows
        return (coefficients.reshape(-1, kr) * along).sum(0).reshape(k, layout.rank).sum(1)

    def _right(self, packed: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        """V^T (..., r, n) from the packed right half: V itself, or rho Q^T in ``basis`` Q (n, d)."""
        right = packed[..., self.layout.m:]
        return right if basis is None else right[..., : basis.shape[1]] @ basis.T

    def _expansion(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The output change along factor rows U^T ``left`` (R, m) and V^T ``right`` (R, n) as
        sum over R of coefficients[..., R] * rows[R]: (coefficients (..., R), rows (R, features),
        the output's channel dimension for a convolution (coefficients and rows have it last) or None).

        Linear: coefficients x V, rows U^T; Embedding: U^T[idx] (zero at padding_idx), rows V^T;
        Conv: conv(x, V_R) per output position, rows U^T."""
        layout, module = self.layout, self.module
        if isinstance(module, nn.Linear):
            flat = x.reshape(-1, layout.n)
            coefficients = (right @ flat.T).mT.reshape(*x.shape[:-1], right.shape[-2])  # one matmul under vmap
            return coefficients, left, None
        if isinstance(module, nn.Embedding):
            coefficients = F.embedding(x, left.mT)  # (..., R)
            if module.padding_idx is not None:
                coefficients = coefficients * (x != module.padding_idx).unsqueeze(-1).to(coefficients.dtype)
            return coefficients, right, None
        channel = self._channel(x)
        kernel = right.reshape(right.shape[-2], *layout.shape[1:])  # (R, in, *kernel)
        return module._conv_forward(x, kernel, None).movedim(channel, -1), left, channel

    def _channel(self, x: torch.Tensor) -> int:
        """A convolution's channel dimension: 1 for a batch (B, C, *spatial), 0 for one unbatched input."""
        return x.dim() - self.module.weight.dim() + 1

    # -- the span of the inputs (input-span tangents) -------------------------------------------------
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The input vectors the weight meets: rows of x (Linear) or input patches (Conv1d/2d), (rows, n)."""
        module = self.module
        if isinstance(module, nn.Linear):
            return x.reshape(-1, self.layout.n)
        two_d = isinstance(module, nn.Conv2d)
        if self._channel(x) == 0:
            x = x.unsqueeze(0)
        pair = (lambda v: tuple(v)) if two_d else (lambda v: (1, v[0]))
        padding = module.padding  # numbers (sees_inputs), of a Conv1d or Conv2d
        patches = F.unfold(x if two_d else x.unsqueeze(-2), pair(module.kernel_size), dilation=pair(module.dilation),
                           padding=pair(padding) if two_d else (0, padding[0]),  # type: ignore[index]
                           stride=pair(module.stride))  # (B, n, L)
        return patches.transpose(1, 2).reshape(-1, self.layout.n)

    def spans_less(self, x: torch.Tensor) -> bool:
        """Whether this call's input vectors (fewer than n) span less than the whole input space."""
        if isinstance(self.module, nn.Linear):
            return x.numel() // self.layout.n < self.layout.n
        return self.patches(x).shape[0] < self.layout.n

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """Q (n, d): orthonormal columns spanning the input vectors, d = min(rows, n), by a reduced QR."""
        q, _ = torch.linalg.qr(self.patches(x).T)
        return q


def _linear_of_tangent(x: torch.Tensor, d_weight: torch.Tensor) -> torch.Tensor:
    """x d_W^T (..., m) as (d_W x^T)^T: one matmul when d_W is batched over tangents and x is not."""
    flat = x.reshape(-1, x.shape[-1])
    return (d_weight @ flat.T).mT.reshape(*x.shape[:-1], d_weight.shape[-2])


class _Layer(torch.autograd.Function):
    """A known layer y = site.forward(x, W, b) whose forward-mode rule adds only the tangents that exist
    (PyTorch's rule multiplies zero tangents too) and the change along a factored weight tangent carried
    by the tangent of ``packed`` (primal zeros, (r, m + n)), in the basis ``basis`` (input-span).

    x, weight and bias come as tensor arguments when they carry a tangent and inside ``held`` (a tuple,
    which forward mode does not look into) when they do not: no zero tangent is formed or multiplied.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, packed, basis, site, held):
        return site.forward(*_resolved((x, weight, bias), held))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _, basis, site, held = inputs
        ctx.save_for_forward(x, weight, basis)
        ctx.site, ctx.held, ctx.shape = site, held, output.shape

    @staticmethod
    def jvp(ctx, d_x, d_weight, d_bias, d_packed, d_basis, d_site, d_held):
        x, weight, basis = ctx.saved_tensors
        x, weight, _ = _resolved((x, weight, None), ctx.held)
        return ctx.site.tangent(x, weight, d_x, d_weight, d_bias, d_packed, basis, ctx.shape)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("frog's layer rules are forward mode only")


class _SpanLayer(torch.autograd.Function):
    """As :class:`_Layer` for an input-span weight at its first call: also returns the basis Q of the
    layer's inputs, computed once from the primal input, in which the right factors lie."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, packed, site, held):
        x, weight, bias = _resolved((x, weight, bias), held)
        return site.forward(x, weight, bias), site.basis(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _, site, held = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(x, weight, output[1])
        ctx.site, ctx.held, ctx.shape = site, held, output[0].shape

    @staticmethod
    def jvp(ctx, d_x, d_weight, d_bias, d_packed, d_site, d_held):
        x, weight, basis = ctx.saved_tensors
        x, weight, _ = _resolved((x, weight, None), ctx.held)
        return ctx.site.tangent(x, weight, d_x, d_weight, d_bias, d_packed, basis, ctx.shape), None

    @staticmethod
    def backward(ctx, grad, grad_basis):
        raise RuntimeError("frog's layer rules are forward mode only")


def _carries_tangent(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` may carry a tangent: only tensors wrapped by a torch.func transform can."""
    return tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _split_held(*tensors: torch.Tensor | None) -> tuple[list[torch.Tensor | None], tuple]:
    """(the tensors that may carry a tangent, None for the others; all of them, held in a tuple)."""
    return [t if _carries_tangent(t) else None for t in tensors], tuple(tensors)


def _resolved(args: tuple, held: tuple) -> tuple:
    """Each argument, or its held value where the argument was left out (None)."""
    return tuple(held[i] if a is None else a for i, a in enumerate(args))


Routes = Mapping[int, tuple[Sequence[nn.Module], LowRank]]  # block -> (modules using it, its layout)


Users = Mapping[str, Sequence[nn.Module]]  # weight name -> the known modules that alone use it


@contextmanager
def forward_rules(routes: Routes, packed: Mapping[int, torch.Tensor], bases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the context, every module of ``routes`` runs as :class:`_Layer`: its output's tangent gains
    the change along the factored tangent of its weight block b, carried by the tangent of ``packed[b]``
    (and PyTorch's products of the constant weight's zero tangent are skipped). Input-span blocks find
    their basis at their first call (stored in ``bases``; later calls of the same weight reuse it); when
    the layer's inputs span the whole space the block stays plain low rank (no entry)."""
    routed = {id(m): (m, b, layout) for b, (mods, layout) in routes.items() for m in mods}

    def rule(module: nn.Module, block: int, layout: LowRank):
        site = Site(module, layout)

        def forward(input: torch.Tensor) -> torch.Tensor:
            (x, weight, bias), held = _split_held(input, site.module.weight, getattr(module, "bias", None))
            if layout.span and block not in bases and site.spans_less(input):
                output, bases[block] = _SpanLayer.apply(x, weight, bias, packed[block], site, held)
                return output
            return _Layer.apply(x, weight, bias, packed[block], bases.get(block), site, held)

        return forward

    for module, block, layout in routed.values():
        module.forward = rule(module, block, layout)
    try:
        yield
    finally:
        for module, _, _ in routed.values():
            del module.forward


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
def basis_hooks(routes: Routes, bases: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the input basis of every input-span block at its first call (as :func:`forward_rules`)."""

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if site.layout.span and b not in bases and site.spans_less(x):
            bases[b] = site.basis(x.detach())
        return output

    with _hooks(routes, on_output):
        yield


@contextmanager
def gradient_taps(routes: Routes, taps: list[tuple[torch.Tensor, list]]) -> Iterator[None]:
    """Every call of a routed module leaves a tap: (anchor, [block, site, input, gradient at the output]).

    The module returns output + anchor, anchor a zero scalar that requires grad, so that a backward
    pass that asks for the anchors' gradients reaches every routed output (the weights themselves
    need no gradient); a tensor hook keeps the output's gradient (as returned: the gradient before
    any later in-place change, e.g. ReLU(inplace=True)), which fills the tap's last entry.
    """

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        anchor = output.new_zeros((), requires_grad=True)
        tapped = output + anchor
        record = [b, site, x.detach(), None]
        tapped.register_hook(lambda grad: record.__setitem__(3, grad))
        taps.append((anchor, record))
        return tapped

    with _hooks(routes, on_output):
        yield


@contextmanager
def shift_hooks(routes: Routes, packed: Mapping[int, torch.Tensor], bases: Mapping[int, torch.Tensor],
                step: float) -> Iterator[None]:
    """Each routed module returns y + step * change: its output with the weight moved by step times
    the tangent in ``packed[b]`` (exact, the layers being linear in their weight)."""

    def on_output(b: int, site: Site, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return site.change(x, packed[b].to(output.dtype), bases.get(b), add_to=output, scale=step)

    with _hooks(routes, on_output):
        yield
