"""Batch normalization on batch statistics (train mode) with its own forward-mode (jvp) rule.

PyTorch differentiates train-mode ``F.batch_norm`` in forward mode by a decomposition into a dozen
elementwise and reduction operations; under ``vmap`` over k tangents each of them runs on the k
tangent streams. :func:`batch_norm` computes the values with PyTorch's kernel (``native_batch_norm``:
the values and running-statistics updates of ``F.batch_norm``, bit for bit on the CPU; on CUDA, where
F.batch_norm takes cuDNN for inputs of 3 or more dimensions, equal up to rounding) and the output
tangent in closed form. Per channel c, over the N = numel / C entries of the other dimensions
of x (B, C, *) (the batch and any spatial ones):

    mu = mean(x),  var = mean((x - mu)^2),  inv = 1 / sqrt(var + eps),  xhat = (x - mu) inv
    y = gamma xhat + beta
    dy = gamma inv (dx - mean(dx) - xhat mean(dx xhat)) + xhat dgamma + dbeta
       = a dx + xhat (dgamma - a mean(dx xhat)) + (dbeta - a mean(dx))      with a = gamma inv

gamma, beta, mu, inv (C,) (gamma = 1, beta = 0 without affine weights). A tangent then costs two
reductions (mean(dx), mean(dx xhat)) and two fused multiply-adds over (B, C, *); xhat is formed once
from the unbatched primal for all k tangents. The vjp is PyTorch's (``native_batch_norm_backward``).

:func:`forward_mode_batch_norm` routes ``torch.nn.functional.batch_norm`` (which ``nn.BatchNorm1d``,
``2d`` and ``3d`` call) to this function while frog's forward-mode engines (``jvp``, ``loop``) run,
for train-mode calls on the devices of :data:`FUSED_DEVICES` only: eval mode (running statistics)
keeps PyTorch's function, whose jvp is a plain affine map, and so do CUDA tensors. Measured
(``benchmarks/engines.py --model resnet18 --ks 16 --no-fused-batchnorm``, activity jvp step, batch 64):
on a 2-core CPU the rule takes the step from 694 to 563 ms; on an H200 it made the step slower, 67
against 35 ms with PyTorch's decomposition (the GPU step is bound by per-call overhead, and a custom
Function under ``vmap`` costs more per call than the elementwise kernels it saves). Set :data:`FUSED` to
False to leave every call to PyTorch (A/B comparisons).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .patching import patched

FUSED = True
"""Whether :func:`forward_mode_batch_norm` routes train-mode batch norm to :func:`batch_norm`."""


FUSED_DEVICES = ("cpu",)
"""Device types whose train-mode batch norm :func:`forward_mode_batch_norm` routes (module docstring)."""

_original = F.batch_norm  # PyTorch's, captured at import: eval-mode calls go to it, never to a patched one


class _BatchNorm(torch.autograd.Function):
    """(y, mu, inv) of train-mode batch norm with an explicit jvp (module docstring) and PyTorch's
    vjp; mu and inv are not differentiable. Given running statistics, the kernel updates them in place
    (within the function, where torch.func sees plain tensors: a captured buffer cannot be written
    from inside a jvp transform)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _, _, _, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.eps = eps
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)

    @staticmethod
    def jvp(ctx, d_x, d_weight, d_bias, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (C,) -> broadcastable against (B, C, *)
        dims = [0, *range(2, x.dim())]
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        scale = invstd if weight is None else invstd * weight  # a = gamma inv
        slope, shift = d_weight, d_bias  # per-channel coefficients of xhat and of 1 in dy
        if d_x is not None:
            slope_x, shift_x = -scale * (d_x * xhat).mean(dims), -scale * d_x.mean(dims)
            slope = slope_x if slope is None else slope + slope_x
            shift = shift_x if shift is None else shift + shift_x
        if slope is not None:
            d_y = xhat * slope.view(shape) if shift is None else torch.addcmul(shift.view(shape), xhat, slope.view(shape))
        elif shift is not None:
            d_y = torch.zeros_like(x).add_(shift.view(shape))  # not an expanded view: the next layer may work in place
        else:
            d_y = torch.zeros_like(x)
        if d_x is not None:
            d_y = d_y.addcmul(d_x, scale.view(shape))
        return d_y.to(x.dtype), None, None  # the statistics of a half-precision x may be float32

    @staticmethod
    def backward(ctx, d_y, _d_mean, _d_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        grads = torch.ops.aten.native_batch_norm_backward(d_y, x, weight, None, None, mean, invstd, True, ctx.eps,
                                                          list(ctx.needs_input_grad[:3]))
        return *grads, None, None, None, None  # None where not needed


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` with a forward-mode rule for train mode; same arguments.

    input (B, C, *), running statistics, weight and bias (C,). training=True normalizes with the
    batch statistics (module docstring) and, given running statistics, updates them in place as
    F.batch_norm does: r <- (1 - momentum) r + momentum s, with the unbiased variance for the running
    variance (``nn.BatchNorm`` passes its cumulative-average factor as momentum when its momentum is
    None). Eval mode (training=False) is F.batch_norm itself.
    """
    if not training or torch.overrides.has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return _original(input, running_mean, running_var, weight, bias, training, momentum, eps)
    F._verify_batch_size(input.size())  # type: ignore[attr-defined]  # private, not in the stubs
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return _BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)[0]


def routed_batch_norm(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What ``F.batch_norm`` is within :func:`forward_mode_batch_norm`: :func:`batch_norm` for inputs on
    a device of :data:`FUSED_DEVICES`, PyTorch's function for the others; same arguments."""
    fused = input.device.type in FUSED_DEVICES
    return (batch_norm if fused else _original)(input, *args, **kwargs)


@contextmanager
def forward_mode_batch_norm() -> Iterator[None]:
    """Within the context (and while :data:`FUSED`), ``torch.nn.functional.batch_norm`` is
    :func:`routed_batch_norm`: train-mode BatchNorm layers on the CPU take the jvp rule of
    :func:`batch_norm`, eval-mode ones and those on other devices PyTorch's.

    Code that calls the function through the module (``F.batch_norm(...)``, as ``nn.BatchNorm*``
    does) is routed; a name imported before keeps PyTorch's. Not thread-safe (it patches a module).
    """
    with patched(F, "batch_norm", routed_batch_norm) if FUSED else nullcontext():
        yield


@contextmanager
def frozen_running_stats(freeze: bool) -> Iterator[list[torch.nn.modules.batchnorm._BatchNorm]]:
    """Stop BatchNorm layers in train mode from updating running statistics (they still use batch
    statistics); yields the frozen modules so the caller can update them once afterwards. Every
    BatchNorm that runs within the context counts, also one outside the model that the loss function
    calls (a GAN's discriminator in the generator's loss)."""
    frozen: list[torch.nn.modules.batchnorm._BatchNorm] = []

    def freeze_on_call(module: torch.nn.Module, args) -> None:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(freeze_on_call) if freeze else None
    try:
        yield frozen
    finally:
        if handle is not None:
            handle.remove()
        for module in frozen:
            module.track_running_stats = True
