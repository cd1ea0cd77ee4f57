"""Tangent samplers (docs/guides/choosing.md) and the block-wise TangentPlan."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KINDS_AND_ANGLES, gen
from hypothesis import given
from hypothesis import strategies as st

import frog

ALL_KINDS = [kind for kind, _ in KINDS_AND_ANGLES]


def sample(k, shape, kind, seed=0, **kw):
    if kind == "angle":
        kw.setdefault("angle", 45.0)
    return frog.sample_tangents(k, shape, kind=kind, generator=gen(seed), **kw)


# -- shapes, determinism, dtype/device ------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_KINDS)
@given(k=st.integers(1, 4), shape=st.one_of(st.integers(4, 9), st.tuples(st.integers(2, 3), st.integers(2, 4))))
def test_shape_int_and_tuple(kind, k, shape):
    v = sample(k, shape, kind)
    expected = (k, shape) if isinstance(shape, int) else (k, *shape)
    assert tuple(v.shape) == expected


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tuple_shape_is_reshaped_flat_sampler(kind):
    """A (2, 3, 4) shape gives the same numbers as dimension 24, only reshaped (one tangent = one
    vector in R^n, whatever its shape)."""
    a = sample(3, (2, 3, 4), kind, seed=7, dtype=torch.float64)
    b = sample(3, 24, kind, seed=7, dtype=torch.float64)
    torch.testing.assert_close(a.reshape(3, -1), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_same_seed_same_tangents(kind):
    a = sample(5, (3, 4), kind, seed=123)
    b = sample(5, (3, 4), kind, seed=123)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "basis"])
def test_different_seed_different_tangents(kind):
    a = sample(5, 12, kind, seed=1)
    b = sample(5, 12, kind, seed=2)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_arguments(kind, dtype):
    v = sample(3, 6, kind, dtype=dtype, device="cpu")
    assert v.dtype == dtype
    assert v.device == torch.device("cpu")
    g = gen(0)
    w = frog.sample_tangents(3, 6, kind=kind, angle=45.0 if kind == "angle" else None, generator=g)
    assert w.device == g.device
    assert w.dtype == torch.get_default_dtype()


@pytest.mark.parametrize("kind", ["normal", "rademacher", "basis"])
def test_meta_device(kind):
    """The device argument is honoured (meta tensors: no data, only device/shape/dtype)."""
    v = frog.sample_tangents(2, 5, kind=kind, device="meta", dtype=torch.float64)
    assert v.device.type == "meta" and v.dtype == torch.float64 and v.shape == (2, 5)


# -- distributions --------------------------------------------------------------------------------
def test_normal_mean_and_variance_plausible():
    k, n = 200, 500
    v = sample(k, n, "normal", seed=3, dtype=torch.float64)
    m = v.numel()
    # mean of m iid N(0,1): sd 1/sqrt(m); sample variance: sd sqrt(2/m)
    assert abs(float(v.mean())) < 5.0 / math.sqrt(m)
    assert abs(float(v.var()) - 1.0) < 5.0 * math.sqrt(2.0 / m)
    # rows are independent: off-diagonal Gram / n is approximately N(0, 1/n)
    gram = (v @ v.T) / n
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert float(off.abs().max()) < 6.0 / math.sqrt(n)


def test_rademacher_entries_are_plus_minus_one():
    v = sample(64, (8, 16), "rademacher", seed=5, dtype=torch.float64)
    assert bool(((v == 1) | (v == -1)).all())
    m = v.numel()
    # P(+1) = 1/2: mean has sd 1/sqrt(m)
    assert abs(float(v.mean())) < 5.0 / math.sqrt(m)


@given(n=st.integers(1, 12), data=st.data())
def test_basis_is_identity_rows(n, data):
    k = data.draw(st.integers(1, n))
    v = sample(k, n, "basis", dtype=torch.float64)
    assert torch.equal(v, torch.eye(n, dtype=torch.float64)[:k])


@given(n=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_orthonormal_rows(n, data, seed):
    k = data.draw(st.integers(1, n))
    v = sample(k, n, "orthonormal", seed=seed, dtype=torch.float64)
    # orthonormal is the Cholesky-QR of the raw Gaussian draw W (the normal draw of this
    # generator): its orthogonality error grows like cond(W)^2 eps, and W is square when k = n
    w = sample(k, n, "normal", seed=seed, dtype=torch.float64)
    tol = 1e-14 * float(torch.linalg.cond(w)) ** 2 + 1e-13
    torch.testing.assert_close(v @ v.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=tol)
    # V is an orthonormalization of W: same row space
    torch.testing.assert_close(v.T @ (v @ w.T), w.T, rtol=0, atol=1e3 * tol * float(w.norm()))


@pytest.mark.parametrize("kind", ["normal", "rademacher", "basis"])
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5))
def test_normalize_gives_unit_rows(kind, seed, k):
    v = sample(k, (2, 4), kind, seed=seed, normalize=True, dtype=torch.float64)
    norms = v.reshape(k, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-12)
    # normalization only rescales: each row is parallel to the unnormalized row
    raw = sample(k, (2, 4), kind, seed=seed, dtype=torch.float64).reshape(k, -1)
    torch.testing.assert_close(v.reshape(k, -1), raw / raw.norm(dim=1, keepdim=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("angle", [15.0, 30.0, 45.0, 60.0, 75.0, 90.0])
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 6), n=st.integers(6, 20))
def test_angle_sampler_angles(angle, seed, k, n):
    v = sample(k, n, "angle", seed=seed, angle=angle, dtype=torch.float64)
    norms = v.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-10)
    cos = (v[1:] @ v[0]) / (norms[1:] * norms[0])
    measured = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    torch.testing.assert_close(measured, torch.full_like(measured, angle), rtol=0, atol=1e-6)


def test_angle_90_rows_are_orthogonal_to_first_and_random():
    v = sample(4, 10, "angle", seed=11, angle=90.0, dtype=torch.float64)
    torch.testing.assert_close(v[1:] @ v[0], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # the other tangents are not all the same vector
    assert float((v[1] - v[2]).norm()) > 1e-3


# -- TangentPlan ----------------------------------------------------------------------------------
SHAPES = [torch.Size((3, 4)), torch.Size((5,)), torch.Size((2, 2, 2))]


def make_plan(kind="normal", k=4, seed=0, step=0, **kw):
    if kind == "angle":
        kw.setdefault("angle", 45.0)
    return frog.TangentPlan(kind, k, SHAPES, seed=seed, step=step, dtype=torch.float64, **kw)


def concatenated(plan):
    return torch.cat([plan.block(b).reshape(plan.num_tangents, -1) for b in range(len(plan.shapes))], dim=1)


MIXED_SHAPES = [(64, 80), (3,)]  # a block drawn row by row (>= SMALL_BLOCK entries) and a small one


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("shapes", [SHAPES, MIXED_SHAPES])
def test_plan_regenerates_blocks_and_rows(kind, cache, shapes):
    assert math.prod(MIXED_SHAPES[0]) >= frog.tangents.SMALL_BLOCK > math.prod(SHAPES[0])
    make = lambda **kw: frog.TangentPlan(kind, 4, shapes, seed=0, step=0, dtype=torch.float64,
                                         angle=45.0 if kind == "angle" else None, **kw)
    plan = make(cache=cache)
    fresh = make()
    for b, shape in enumerate(shapes):
        block = plan.block(b)
        assert block.shape == (4, *shape)
        assert torch.equal(plan.block(b), block)  # regenerating a block
        assert torch.equal(fresh.block(b), block)  # another plan with the same key
        for i in range(4):
            assert torch.equal(plan.block(b, [i])[0], block[i])  # a single row
        assert torch.equal(plan.block(b, [3, 1]), block[[3, 1]])


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("track_gram", [False, True])
def test_plan_gram_is_gram_of_concatenated_blocks(kind, track_gram):
    plan = make_plan(kind, track_gram=track_gram)
    full = concatenated(make_plan(kind))
    torch.testing.assert_close(plan.gram(), full @ full.T, rtol=1e-12, atol=1e-12)
    assert plan.gram().dtype == torch.float64 and plan.gram().shape == (4, 4)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_plan_gram_after_partial_generation(kind):
    """Blocks generated (and Gram-tracked) before gram() and blocks never asked for both count."""
    plan = make_plan(kind, track_gram=True)
    plan.block(1)
    plan.block(1)  # twice: must not be counted twice
    full = concatenated(make_plan(kind))
    torch.testing.assert_close(plan.gram(), full @ full.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_plan_transform_gives_the_sampler(kind):
    """V = T W has the sampler's defining property over the concatenated blocks."""
    plan = make_plan(kind, angle=60.0 if kind == "angle" else None)
    w = concatenated(plan)
    t = plan.transform()
    v = w if t is None else t @ w
    if kind == "basis":
        assert torch.equal(v, torch.eye(w.shape[1], dtype=torch.float64)[:4])
    if kind == "orthonormal":
        torch.testing.assert_close(v @ v.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    if kind == "angle":
        torch.testing.assert_close(v.norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(v[1:] @ v[0], torch.full((3,), 0.5, dtype=torch.float64), rtol=0, atol=1e-10)
    if kind == "rademacher":
        assert bool(((v == 1) | (v == -1)).all())


def test_plan_normalize_transform_gives_unit_rows():
    plan = make_plan("normal", normalize=True)
    v = plan.transform() @ concatenated(plan)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "basis"])
def test_plan_different_step_or_seed_differs(kind):
    a = concatenated(make_plan(kind, step=0))
    b = concatenated(make_plan(kind, step=1))
    c = concatenated(make_plan(kind, seed=1))
    assert not torch.equal(a, b)
    assert not torch.equal(a, c)
    # blocks and rows are also distinct from each other (independent streams)
    plan = make_plan(kind)
    assert not torch.equal(plan.block(0)[0], plan.block(0)[1])
    assert not torch.equal(plan.block(0)[0, :2, :2].reshape(-1), plan.block(2)[0, :2, :].reshape(-1))


def test_plan_basis_spans_blocks():
    """basis row i sits at global coordinate i across block boundaries."""
    plan = frog.TangentPlan("basis", 14, SHAPES, seed=0, step=0, dtype=torch.float64)
    assert torch.equal(concatenated(plan), torch.eye(25, dtype=torch.float64)[:14])  # n = 12 + 5 + 8


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_kind_lists_kinds():
    with pytest.raises(ValueError, match="unknown tangent sampler 'gauss'; choose one of normal, rademacher, basis, orthonormal, angle"):
        frog.sample_tangents(2, 4, kind="gauss")


@pytest.mark.parametrize("angle", [0.0, -1.0, 90.5])
def test_angle_out_of_range(angle):
    with pytest.raises(ValueError, match=r"angle must lie in \(0, 90\] degrees"):
        frog.sample_tangents(2, 4, kind="angle", angle=angle)
    with pytest.raises(ValueError, match=r"angle must lie in \(0, 90\] degrees"):
        frog.TangentPlan("angle", 2, [torch.Size((4,))], seed=0, step=0, angle=angle)


def test_plan_size_errors():
    with pytest.raises(ValueError, match="at most n = 5"):
        frog.TangentPlan("basis", 6, [torch.Size((2,)), torch.Size((3,))], seed=0, step=0)
    with pytest.raises(ValueError, match="integer >= 1"):
        frog.TangentPlan("normal", 0, [torch.Size((2,))], seed=0, step=0)
    with pytest.raises(ValueError, match="dimension n >= 2"):
        frog.sample_tangents(2, 1, kind="angle", angle=30.0)


# -- batched draws ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("batch", [3, (2, 2)])
def test_batched_draws_shape_and_sampler_property(kind, batch):
    v = sample(3, (2, 3), kind, seed=4, batch=batch, dtype=torch.float64)
    lead = (batch,) if isinstance(batch, int) else batch
    assert v.shape == (*lead, 3, 2, 3)
    flat = v.reshape(-1, 3, 6)
    for w in flat:
        if kind == "basis":
            assert torch.equal(w, torch.eye(6, dtype=torch.float64)[:3])
        elif kind == "orthonormal":
            torch.testing.assert_close(w @ w.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
        elif kind == "angle":
            torch.testing.assert_close(w.norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
            torch.testing.assert_close(w[1:] @ w[0], torch.full((2,), math.sqrt(0.5), dtype=torch.float64), rtol=0, atol=1e-10)
        elif kind == "rademacher":
            assert bool(((w == 1) | (w == -1)).all())
    if kind != "basis":  # independent draws per batch entry
        assert not torch.equal(flat[0], flat[1])
    assert torch.equal(v, sample(3, (2, 3), kind, seed=4, batch=batch, dtype=torch.float64))


def test_batched_normalize_gives_unit_rows():
    v = sample(4, 7, "normal", seed=0, batch=5, normalize=True, dtype=torch.float64)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-12)
