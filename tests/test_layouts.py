"""Block layouts (docs/guides/structured-tangents.md): low-rank factors give the Gram matrix, estimate and jvps of the tangents
they stand for, checked against the tangents formed densely; their second moments are the identity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen

import frog
from frog.layouts import Dense, LowRank, matrix_shape
from frog.tangents import TangentPlan

F64 = torch.float64


def packed(k, layout, seed=0):
    return torch.randn(k, *layout.stored, generator=gen(seed), dtype=F64)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (6, 1, 2, 2)])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("with_basis", [False, True])
def test_low_rank_layout_matches_dense_tangents(shape, rank, with_basis):
    layout = LowRank(torch.Size(shape), rank, span=with_basis)
    m, n = matrix_shape(shape)
    k = 7
    raw = packed(k, layout)
    if with_basis:  # an orthonormal basis of a 2-dimensional subspace
        layout.basis = torch.linalg.qr(torch.randn(n, 2, generator=gen(5), dtype=F64))[0]
    dense = layout.dense(raw)
    assert dense.shape == (k, *shape)
    # the tangents themselves: U_i^T V_i / sqrt(r) with V_i = rho_i Q^T
    u = raw[..., :m]
    v = raw[..., m:] if not with_basis else raw[..., m:m + 2] @ layout.basis.T
    expected = torch.einsum("kra,krb->kab", u, v) / math.sqrt(rank)
    torch.testing.assert_close(dense.reshape(k, m, n), expected)
    flat = dense.reshape(k, -1)
    torch.testing.assert_close(layout.gram(raw), flat @ flat.T)
    torch.testing.assert_close(layout.squared_norms(raw), (flat * flat).sum(1))
    c = torch.randn(k, generator=gen(1), dtype=F64)
    torch.testing.assert_close(layout.estimate(raw, c), (flat.T @ c).reshape(shape))
    g = torch.randn(shape, generator=gen(2), dtype=F64)
    torch.testing.assert_close(layout.inner(raw, g, 1)[:, 0], flat @ g.reshape(-1))


def test_dense_layout_inner_per_sample():
    layout = Dense(torch.Size((3, 2)))
    raw = packed(4, layout)
    grads = torch.randn(5, 3, 2, generator=gen(1), dtype=F64)
    torch.testing.assert_close(layout.inner(raw, grads, 5), raw.reshape(4, -1) @ grads.reshape(5, -1).T)


def test_low_rank_second_moments_are_the_identity():
    """E[vec(W) vec(W)^T] = I for W = U V^T / sqrt(r): the same second moments as dense N(0, 1) tangents."""
    samples, shape = 40000, (3, 4)
    for rank in (1, 3):
        tangents = frog.sample_tangents(samples, shape, "lowrank", rank=rank, generator=gen(rank), dtype=F64)
        flat = tangents.reshape(samples, -1)
        second = flat.T @ flat / samples
        # each entry of the estimated E[w_a w_b] has standard deviation <= 3/sqrt(samples) (E[w^4] <= 9)
        assert float((second - torch.eye(12, dtype=F64)).abs().max()) < 6 * 3 / math.sqrt(samples)
        assert float(flat.mean(0).abs().max()) < 6 / math.sqrt(samples)


def test_plan_keeps_only_factors_and_regenerates_the_same_rows():
    shapes = [torch.Size((30, 20)), torch.Size((30,)), torch.Size((8, 3, 3, 3))]
    plan = TangentPlan("lowrank", 5, shapes, seed=3, step=1, dtype=F64, rank=2)
    assert [tuple(plan.block(b).shape) for b in range(3)] == [(5, 2, 50), (5, 30), (5, 2, 35)]
    fresh = TangentPlan("lowrank", 5, shapes, seed=3, step=1, dtype=F64, rank=2)
    for b in range(3):
        torch.testing.assert_close(fresh.block(b, [4, 1]), plan.block(b)[[4, 1]], rtol=0, atol=0)
    full = torch.cat([plan.dense(b).reshape(5, -1) for b in range(3)], dim=1)
    torch.testing.assert_close(plan.gram(), full @ full.T)
    other_step = TangentPlan("lowrank", 5, shapes, seed=3, step=2, dtype=F64, rank=2)
    assert not torch.equal(other_step.block(0), plan.block(0))


def test_sample_tangents_structured_errors():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        frog.sample_tangents(3, 10, "lowrank")
    with pytest.raises(ValueError, match="fill_grad"):
        frog.sample_tangents(3, (4, 4), "input-span")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        frog.sample_tangents(3, (4, 4), "lowrank", rank=0)
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(m, n\) = 4"):
        frog.sample_tangents(3, (4, 6), "lowrank", rank=5)
    with pytest.raises(ValueError, match="only used with sampler='lowrank'"):
        frog.sample_tangents(3, (4, 6), "normal", rank=2)
