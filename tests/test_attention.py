"""frog.forward_mode.attention: values equal PyTorch's SDPA, jvps and vjps equal autograd's, and the engines run
attention modules in forward mode with the same estimates as the sim engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import frog
from frog.forward_mode.attention import forward_mode_attention, scaled_dot_product_attention

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(dtype=F64, device="cpu", heads=4, kv_heads=4, seed=0):
    g = gen(seed)
    q = torch.randn(2, heads, 5, 8, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, 7, 8, generator=g, dtype=dtype)
    v = torch.randn(2, kv_heads, 7, 3, generator=g, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


def bool_mask():
    mask = torch.rand(2, 1, 5, 7, generator=gen(1)) > 0.4
    mask[0, 0, 2] = False  # a row with every key masked out: PyTorch returns zeros there
    return mask


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "negative scale": {"scale": -0.2},
    "float mask": {"attn_mask": torch.randn(5, 7, generator=gen(2), dtype=F64)},
    "bool mask": {"attn_mask": bool_mask()},
    "dropout": {"dropout_p": 0.3},
    "gqa": {"enable_gqa": True},
    "all": {"attn_mask": bool_mask(), "dropout_p": 0.2, "scale": 0.5, "enable_gqa": True},
}


def arguments(case, device="cpu", dtype=F64):
    kwargs = dict(CASES[case])
    if "attn_mask" in kwargs:
        mask = kwargs["attn_mask"]
        kwargs["attn_mask"] = mask.to(device) if mask.dtype == torch.bool else mask.to(device, dtype)
    heads = (4, 2) if kwargs.get("enable_gqa") else (4, 4)
    return qkv(dtype, device, *heads), kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_values_equal_pytorch_math_backend_bit_for_bit(case):
    """Same operations in the same order as PyTorch's math backend, dropout masks included."""
    (q, k, v), kwargs = arguments(case, dtype=torch.float32)
    torch.manual_seed(7)
    ours = scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(ours, theirs)
    if not kwargs.get("dropout_p"):  # the default (fused) kernel: equal up to rounding
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **kwargs))


def reference(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention written out with plain operations (autograd and forward AD differentiate it)."""
    if enable_gqa:
        k, v = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3), v.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask
    empty = (scores == -math.inf).all(-1, keepdim=True)  # rows without any key: zeros
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if dropout_p:
        probs = torch.dropout(probs, dropout_p, True)
    return probs @ v


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_and_vjp_equal_autograd_of_plain_attention(case):
    (q, k, v), kwargs = arguments(case)
    g = gen(3)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=F64) for t in (q, k, v))
    torch.manual_seed(4)
    out, d_out = jvp(lambda *a: scaled_dot_product_attention(*a, **kwargs), (q, k, v), tangents)
    torch.manual_seed(4)
    ref_out, ref_d = jvp(lambda *a: reference(*a, **kwargs), (q, k, v), tangents)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_out, ref_d, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn(out.shape, generator=g, dtype=F64)
    grads = []
    for fn in (scaled_dot_product_attention, reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(4)
        grads.append(torch.autograd.grad((fn(*leaves, **kwargs) * cotangent).sum(), leaves))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_jvp_of_a_float_mask_that_depends_on_parameters():
    """A learned additive bias (e.g. relative positions) carries a tangent too."""
    q, k, v = qkv()
    bias = torch.randn(5, 7, generator=gen(5), dtype=F64)
    d_bias = torch.randn(5, 7, generator=gen(6), dtype=F64)
    _, ours = jvp(lambda b: scaled_dot_product_attention(q, k, v, attn_mask=b), (bias,), (d_bias,))
    _, theirs = jvp(lambda b: reference(q, k, v, attn_mask=b), (bias,), (d_bias,))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_vmap_over_tangents_equals_one_jvp_per_tangent():
    q, k, v = qkv()
    tangents = torch.randn(6, *q.shape, generator=gen(7), dtype=F64)

    def one(t):
        return jvp(lambda x: scaled_dot_product_attention(x, k, v, is_causal=True), (q,), (t,))[1]

    torch.testing.assert_close(vmap(one)(tangents), torch.stack([one(t) for t in tangents]), rtol=1e-12, atol=1e-13)


def test_bad_arguments_say_what_to_change():
    q, k, v = qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        scaled_dot_product_attention(q, k, v, enable_gqa=True)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=bool_mask(), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="same dtype"):
        scaled_dot_product_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int64))


def test_context_routes_and_restores():
    original, fastpath = F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="inside"), forward_mode_attention():
        assert F.scaled_dot_product_attention is scaled_dot_product_attention
        assert not torch.backends.mha.get_fastpath_enabled()
        raise RuntimeError("inside")
    assert F.scaled_dot_product_attention is original
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


# -- the engines on attention modules ---------------------------------------------------------------
class SdpaBlock(nn.Module):
    """Self-attention through F.scaled_dot_product_attention with a padding mask given as a keyword."""

    def __init__(self, dim=8, heads=2, dropout=0.0):
        super().__init__()
        self.qkv, self.proj, self.heads, self.dropout = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, dropout

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, c))


class AttentionNet(nn.Module):
    """Tokens (B, T, 8) -> per-sample losses, through a layer of the given kind; not an nn.Sequential."""

    def __init__(self, kind, dropout=0.1):
        super().__init__()
        if kind == "encoder":  # its dropout after the attention acts on a transposed tensor, and
            dropout = 0.0  # torch.func draws other masks there than eager PyTorch (equally valid ones)
        self.embed = nn.Linear(4, 8)
        if kind == "sdpa":
            self.layer = SdpaBlock(8, 2, dropout)
        elif kind == "mha":
            self.layer = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
        else:
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
        self.kind = kind
        self.out = nn.Linear(8, 3)

    def forward(self, x, padding):
        h = self.embed(x)
        if self.kind == "sdpa":
            h = self.layer(h, mask=~padding[:, None, None, :])
        elif self.kind == "mha":
            h = self.layer(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        else:
            h = self.layer(h, src_key_padding_mask=padding)
        return self.out(h.mean(1))


def estimates(model, engine, perturbation, x, padding, y, seed=0):
    model = copy.deepcopy(model)
    fg = frog.ForwardGradient(4, engine=engine, perturbation=perturbation, seed=seed)
    reduction = "none" if perturbation == "activity" else "mean"
    torch.manual_seed(seed)  # dropout masks: every engine starts from the same random state
    fg.fill_grad(model, lambda m: F.cross_entropy(m(x, padding), y, reduction=reduction))
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("train", [True, False], ids=["train-dropout", "eval-fastpath"])
@pytest.mark.parametrize("perturbation", ["weight", "activity"])
@pytest.mark.parametrize("kind", ["sdpa", "mha", "encoder"])
def test_forward_engines_equal_sim_on_attention_modules(kind, perturbation, train):
    """nn.MultiheadAttention, nn.TransformerEncoderLayer (in eval mode PyTorch would take its fused
    fast path) and a block calling SDPA with a mask keyword: jvp and loop give sim's estimate."""
    torch.manual_seed(0)
    model = AttentionNet(kind).double().train(train)
    g = gen(8)
    x, y = torch.randn(3, 6, 4, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    sim = estimates(model, "sim", perturbation, x, padding, y)
    assert all(torch.isfinite(s).all() for s in sim) and sum(float(s.norm()) for s in sim) > 0
    for engine in ("jvp", "loop"):
        for got, want in zip(estimates(model, engine, perturbation, x, padding, y), sim, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("dropout", "all")])
def test_cuda_values_and_jvps(case):
    (q, k, v), kwargs = arguments(case, "cuda", torch.float32)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    out, d_out = jvp(lambda *a: scaled_dot_product_attention(*a, **kwargs), (q, k, v), tangents)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=1e-4, atol=1e-5)
    _, ref_d = jvp(lambda *a: reference(*a, **kwargs), (q, k, v), tangents)
    torch.testing.assert_close(d_out, ref_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "causal", "bool mask", "dropout", "all", "float mask"])
def test_query_blocks_give_the_same_values_jvps_and_vjps(case, monkeypatch):
    """Long inputs run a block of query rows at a time: the same numbers as one call."""
    (q, k, v), kwargs = arguments(case)
    g = gen(8)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=F64) for t in (q, k, v))
    cotangent = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=F64)
    results = []
    for elements in (10**9, 2 * 4 * 7 * 2):  # one call; blocks of 2 query rows (3 blocks of 5 rows)
        monkeypatch.setattr(frog.forward_mode.attention, "CHUNK_ELEMENTS", elements)
        torch.manual_seed(4)
        out, d_out = jvp(lambda *a: scaled_dot_product_attention(*a, **kwargs), (q, k, v), tangents)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(4)
        grads = torch.autograd.grad((scaled_dot_product_attention(*leaves, **kwargs) * cotangent).sum(), leaves)
        results.append((out, d_out, *grads))
    for whole, blocks in zip(*results, strict=True):
        torch.testing.assert_close(blocks, whole, rtol=1e-12, atol=1e-12)
