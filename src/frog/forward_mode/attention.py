"""Scaled dot-product attention with its own forward-mode (jvp) rule.

PyTorch's fused attention kernels (flash, memory-efficient) have no forward-mode AD rule, so
``torch.func.jvp`` fails on ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer``. :func:`scaled_dot_product_attention` computes the same values (the
operations of PyTorch's math backend, in the same order: equal bit for bit to
``sdpa_kernel(SDPBackend.MATH)`` on CPU, dropout masks included) and the output tangent in one pass:

    S = (q f)(k f)^T + bias,   P = softmax(S),   P_d = P * noise,   O = P_d v
    dS = (dq f)(k f)^T + (q f)(dk f)^T + dbias,   r = rowsum(P * dS)
    dO = (P_d * dS) v - r * O + P_d dv

with f = sqrt(|scale|) (q's factor negative for a negative scale), noise the dropout multipliers
(0 or 1 / (1 - p)), shapes q (..., L, E), k (..., S, E), v (..., S, Ev), S and P (..., L, S). This
is softmax's jvp dP = P * (dS - r) folded into the product with v, as forward-mode flash attention
does: P and P_d are the only (L, S) tensors kept, and a tangent (batched over the k tangents by
``vmap``) costs one matmul for dS (of the concatenated operands [dq f, q f] [k f, dk f]^T), one
(L, S) product, one row sum and the two matmuls with v and dv: 1.2-2x faster than PyTorch's
op-by-op jvp of the same attention (benchmarks/attention.py).

Inputs with more than :data:`CHUNK_ELEMENTS` (L, S) entries run a block of query rows at a time (rows
attend independently), so a long sequence holds the (L, S) tensors of one block, not of all L rows:
the memory of PyTorch's fused kernels, which never form them, is out of reach, but a GPT of
sequence 512 no longer spends most of a jvp's memory on them (benchmarks/memory_frontier.py).
Smaller inputs take one call, whose values equal the math backend's bit for bit.

:func:`forward_mode_attention` routes ``torch.nn.functional.scaled_dot_product_attention`` to this
function while frog's forward-mode engines (``jvp``, ``loop``) run, and turns off the fused fast
paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``, so these modules work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .patching import patched

# At most this many (L, S) entries per call of the attention Function: longer inputs run a block of
# query rows at a time, so the (L, S) tensors (scores, probabilities, their tangents) of one block
# live at once instead of all of them (2^18 float32 entries: 1 MB per tensor and tangent stream)
CHUNK_ELEMENTS = 2**18


class _Attention(torch.autograd.Function):
    """O = (softmax((q f_q)(k f)^T + bias) * noise) v with an explicit jvp (module docstring) and
    vjp. Also returns P and P_d (not differentiable) so that they are kept, not recomputed."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, bias, noise, scale_q: float, scale_k: float):
        scores = (query * scale_q) @ (key.transpose(-2, -1) * scale_k)  # (..., L, S)
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, -1)
        if bias is not None:  # rows with every score masked out give zeros, not NaN (as PyTorch does)
            probs = torch.where((scores == -math.inf).all(-1, keepdim=True), 0.0, probs)
        dropped = probs if noise is None else probs * noise
        return dropped @ value, probs, dropped

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, value, bias, noise, scale_q, scale_k = inputs
        out, probs, dropped = output
        ctx.mark_non_differentiable(probs, dropped)
        ctx.scales = scale_q, scale_k
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.has_noise = noise is not None
        saved = (query, key, value, out, probs, dropped, *((noise,) if noise is not None else ()))
        ctx.save_for_forward(*saved)
        ctx.save_for_backward(*saved)

    @staticmethod
    def jvp(ctx, d_query, d_key, d_value, d_bias, d_noise, d_scale_q, d_scale_k):
        query, key, value, out, probs, dropped = ctx.saved_tensors[:6]
        scale_q, scale_k = ctx.scales
        d_scores = None
        if d_query is not None and d_key is not None:  # one matmul: [dq f_q, q f_q] [k f, dk f]^T
            left = torch.cat([d_query, query.expand_as(d_query)], -1) * scale_q
            right = torch.cat([key.expand_as(d_key), d_key], -1) * scale_k
            d_scores = left @ right.transpose(-2, -1)
        elif d_query is not None:
            d_scores = (d_query * scale_q) @ (key.transpose(-2, -1) * scale_k)
        elif d_key is not None:
            d_scores = (query * scale_q) @ (d_key.transpose(-2, -1) * scale_k)
        if d_bias is not None:
            d_scores = d_bias if d_scores is None else d_scores + d_bias
        d_out = None
        if d_scores is not None:
            weighted = probs * d_scores  # P * dS
            row = weighted.sum(-1, keepdim=True)  # r = rowsum(P * dS)
            if ctx.has_noise:
                weighted = dropped * d_scores  # P_d * dS
            d_out = weighted @ value - row * out
        if d_value is not None:
            term = dropped @ d_value
            d_out = term if d_out is None else d_out + term
        if d_out is None:
            d_out = torch.zeros_like(out)
        return d_out, None, None

    @staticmethod
    def backward(ctx, d_out, _d_probs, _d_dropped):
        query, key, value, _, probs, dropped = ctx.saved_tensors[:6]
        scale_q, scale_k = ctx.scales
        d_value = (dropped.transpose(-2, -1) @ d_out).sum_to_size(value.shape)
        d_probs = d_out @ value.transpose(-2, -1)
        if ctx.has_noise:
            d_probs = d_probs * ctx.saved_tensors[6]
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
        d_query = ((d_scores @ (key * scale_k)) * scale_q).sum_to_size(query.shape)
        d_key = ((d_scores.transpose(-2, -1) @ (query * scale_q)) * scale_k).sum_to_size(key.shape)
        d_bias = None if ctx.bias_shape is None else d_scores.sum_to_size(ctx.bias_shape)
        return d_query, d_key, d_value, d_bias, None, None, None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with a forward-mode rule; same arguments.

    query (..., H, L, E), key (..., H_kv, S, E), value (..., H_kv, S, Ev) -> (..., H, L, Ev).
    attn_mask: bool (True = takes part) or additive float, broadcastable to (..., L, S); is_causal
    masks out key j > query i; scale defaults to 1 / sqrt(E); enable_gqa repeats each key/value head
    H / H_kv times. Dropout draws from the global generator like PyTorch's math backend.
    """
    _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    factor = math.sqrt(abs(scale))  # q and k are both scaled by sqrt(|scale|), as PyTorch does
    bias = attn_mask
    if is_causal:
        bias = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill_(bias.logical_not(), -math.inf)
    noise = None
    if dropout_p > 0.0:  # 0 or 1 / (1 - p): the same random numbers as torch.dropout on the scores
        length = key.shape[-2]
        shape = torch.broadcast_shapes((*query.shape[:-1], length), (*key.shape[:-2], 1, length),
                                       () if bias is None else bias.shape)
        noise = torch.dropout(torch.ones(shape, dtype=query.dtype, device=query.device), dropout_p, True)
    scale_q = -factor if scale < 0 else factor
    rows = max(1, CHUNK_ELEMENTS // (math.prod(query.shape[:-2]) * key.shape[-2]))
    if rows >= query.shape[-2]:
        return _Attention.apply(query, key, value, bias, noise, scale_q, factor)[0]
    parts = []
    for start in range(0, query.shape[-2], rows):  # query rows attend independently: a block at a time
        piece = slice(start, start + rows)
        parts.append(_Attention.apply(query[..., piece, :], key, value, _query_rows(bias, piece),
                                      _query_rows(noise, piece), scale_q, factor)[0])
    return torch.cat(parts, -2)


def _query_rows(tensor: torch.Tensor | None, piece: slice) -> torch.Tensor | None:
    """The rows ``piece`` of a (..., L, S) bias or dropout noise (one broadcast over L stays whole)."""
    if tensor is None or tensor.dim() < 2 or tensor.shape[-2] == 1:
        return tensor
    return tensor[..., piece, :]


def _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    """ValueError, naming the argument, for inputs PyTorch's attention would also reject."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            raise ValueError(f"scaled_dot_product_attention: {name} must be a tensor (..., length, features)")
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise ValueError("scaled_dot_product_attention: query, key and value need the same dtype and device, "
                             f"got {query.dtype}/{key.dtype}/{value.dtype} on {query.device}/{key.device}/{value.device}")
    if key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: query (..., L, E) {tuple(query.shape)}, key (..., S, E) "
                         f"{tuple(key.shape)} and value (..., S, Ev) {tuple(value.shape)} do not fit together")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must lie in [0, 1), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: pass either attn_mask or is_causal=True, not both")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        raise ValueError(f"scaled_dot_product_attention: attn_mask must be bool or {query.dtype} like the query, "
                         f"got {attn_mask.dtype}")
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] % key.shape[-3]:
        raise ValueError(f"scaled_dot_product_attention: with enable_gqa the query heads ({query.shape[-3]}) must "
                         f"be a multiple of the key/value heads ({key.shape[-3]})")


_original = F.scaled_dot_product_attention  # PyTorch's, captured at import (never a patched one)


def frog_when_dropping(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the masks of :func:`scaled_dot_product_attention` where it
    drops (``dropout_p > 0``), PyTorch's fused kernels where not (:mod:`frog.forward_mode.masks` routes to it)."""
    attention = scaled_dot_product_attention if dropout_p > 0.0 else _original
    return attention(query, key, value, attn_mask, dropout_p, *args, **kwargs)


@contextmanager
def forward_mode_attention() -> Iterator[None]:
    """Within the context, ``torch.nn.functional.scaled_dot_product_attention`` is
    :func:`scaled_dot_product_attention` and the fused fast paths of ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` are off, so that ``torch.func.jvp`` runs through attention.

    Code that calls the function through the module (``F.scaled_dot_product_attention(...)``, as
    PyTorch's own modules do) is routed; a name imported before (``from torch.nn.functional import
    scaled_dot_product_attention``) keeps the fused kernel. Not thread-safe (it patches a module).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with patched(F, "scaled_dot_product_attention", scaled_dot_product_attention):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
