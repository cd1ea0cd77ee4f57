"""Aggregation of jvps (docs/architecture.md, the one idea): Lemma 1, Lemma 2, sum/mean/project, scale correction."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, lstsq_projection, projection_matrix, rel_err
from hypothesis import given
from hypothesis import strategies as st

import frog

METHODS = list(frog.METHODS)
F64 = torch.float64


def gaussian(k, n, seed):
    return torch.randn(k, n, generator=gen(seed), dtype=F64)


def cosine(a, b):
    return float(a.reshape(-1) @ b.reshape(-1) / (a.norm() * b.norm()))


# -- Lemma 1: every estimate lies in span(V) -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10), data=st.data())
def test_lemma1_estimate_in_span(method, seed, n, data):
    k = data.draw(st.integers(1, n - 1))
    v = gaussian(k, n, seed)
    g = gaussian(1, n, seed + 1)[0]
    est = frog.aggregate(v, v @ g, method)
    assert est.shape == (n,)
    # least-squares fit of est by the rows of V: the residual must vanish
    fit = lstsq_projection(v, est)
    assert float((fit - est).norm()) <= 1e-10 * max(float(est.norm()), 1e-300)
    # ... while g itself is generally not in span(V) (k < n), so the check has teeth
    assert float((lstsq_projection(v, g) - g).norm()) > 1e-6 * float(g.norm())


# -- Lemma 2: project is the orthogonal projection of the gradient ---------------------------------
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), data=st.data())
def test_lemma2_project_is_least_squares_projection(seed, n, data):
    k = data.draw(st.integers(1, n))
    v = gaussian(k, n, seed)
    g = gaussian(1, n, seed + 1)[0]
    est = frog.aggregate(v, v @ g, "project")
    expected = lstsq_projection(v, g)
    assert rel_err(est, expected) < 1e-8
    # best approximation within U: the residual g - est is orthogonal to every tangent
    torch.testing.assert_close(v @ (g - est), torch.zeros(k, dtype=F64), rtol=0, atol=1e-9 * float(g.norm() * v.norm()))


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12))
def test_project_exact_at_k_equals_n(seed, n):
    v = gaussian(n, n, seed)
    g = gaussian(1, n, seed + 1)[0]
    est = frog.aggregate(v, v @ g, "project")
    cond = float(torch.linalg.cond(v))
    assert rel_err(est, g) < 1e-13 * cond**2 + 1e-12


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), extra=st.integers(1, 6))
def test_project_k_greater_than_n(seed, n, extra):
    v = gaussian(n + extra, n, seed)
    g = gaussian(1, n, seed + 1)[0]
    est = frog.aggregate(v, v @ g, "project")
    # span(V) = R^n, so the projection is g itself (pinv projector = I)
    torch.testing.assert_close(est, projection_matrix(v) @ g, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(est, g, rtol=1e-7, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 10), data=st.data())
def test_project_rank_deficient(seed, n, data):
    r = data.draw(st.integers(1, n - 1))
    k = data.draw(st.integers(r + 1, n + 3))
    a = gaussian(k, r, seed)
    b = gaussian(r, n, seed + 1)
    v = a @ b  # rank r < k
    assert int(torch.linalg.matrix_rank(v)) == r
    g = gaussian(1, n, seed + 2)[0]
    est = frog.aggregate(v, v @ g, "project")
    expected = projection_matrix(v) @ g
    assert rel_err(est, expected) < 1e-6
    # the projection onto span(B) computed from an orthonormal basis (SVD) agrees too
    u = torch.linalg.svd(b, full_matrices=False).Vh  # (r, n), orthonormal rows spanning span(V)
    assert rel_err(est, u.T @ (u @ g)) < 1e-6


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 10), data=st.data())
def test_project_duplicate_and_zero_rows(seed, n, data):
    k = data.draw(st.integers(1, n - 1))
    v0 = gaussian(k, n, seed)
    v = torch.cat([v0, v0[:1], 2.5 * v0[-1:], torch.zeros(1, n, dtype=F64)])
    g = gaussian(1, n, seed + 1)[0]
    est = frog.aggregate(v, v @ g, "project")
    assert rel_err(est, lstsq_projection(v0, g)) < 1e-6
    assert rel_err(est, projection_matrix(v) @ g) < 1e-6


# -- sum and mean ----------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10), data=st.data())
def test_sum_and_mean(seed, n, data):
    k = data.draw(st.integers(1, 2 * n))
    v = gaussian(k, n, seed)
    g = gaussian(1, n, seed + 1)[0]
    d = v @ g
    s = frog.aggregate(v, d, "sum")
    m = frog.aggregate(v, d, "mean")
    # closed forms: sum = V^T V g, mean = sum / k
    torch.testing.assert_close(s, v.T @ (v @ g), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m, s / k, rtol=1e-12, atol=1e-12)
    # conical combinations of the same vectors: same cosine to g, and a descent direction
    assert abs(cosine(s, g) - cosine(m, g)) < 1e-12
    assert float(s @ g) >= 0 and float(m @ g) >= 0


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10), data=st.data())
def test_orthonormal_sum_equals_project(seed, n, data):
    k = data.draw(st.integers(1, n))
    v = frog.sample_tangents(k, n, kind="orthonormal", generator=gen(seed), dtype=F64)
    g = gaussian(1, n, seed + 1)[0]
    d = v @ g
    # sum - project = V^T (I - G^-1) V g with G = V V^T; |I - G^-1| ~ |G - I| (the sampler's own
    # orthogonality error, which grows with the conditioning of its raw draw at k = n)
    defect = float(torch.linalg.matrix_norm(v @ v.T - torch.eye(k, dtype=F64), 2))
    tol = 4 * defect * float(g.norm()) + 1e-13 * float(g.norm())
    torch.testing.assert_close(frog.aggregate(v, d, "sum"), frog.aggregate(v, d, "project"), rtol=0, atol=tol)


def test_project_has_best_cosine_and_sum_mean_share_it():
    """Lemma 2 implies cos(project, g) >= cos(any vector in span(V), g), in particular sum/mean."""
    for seed in range(10):
        v = gaussian(4, 30, seed)
        g = gaussian(1, 30, 100 + seed)[0]
        d = v @ g
        cp = cosine(frog.aggregate(v, d, "project"), g)
        cs = cosine(frog.aggregate(v, d, "sum"), g)
        cm = cosine(frog.aggregate(v, d, "mean"), g)
        assert cp >= cs - 1e-12
        assert abs(cs - cm) < 1e-12


# -- batched jvps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), batch=st.integers(1, 4))
def test_batched_jvps_match_columnwise(method, seed, k, batch):
    shape = (2, 3)
    v = torch.randn(k, *shape, generator=gen(seed), dtype=F64)
    gs = torch.randn(batch, *shape, generator=gen(seed + 1), dtype=F64)
    jvps = torch.einsum("kij,bij->kb", v, gs)  # (k, B)
    est = frog.aggregate(v, jvps, method)
    assert est.shape == (*shape, batch)
    for b in range(batch):
        torch.testing.assert_close(est[..., b], frog.aggregate(v, jvps[:, b], method), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_coefficients_and_combine(method):
    v = gaussian(4, 9, 0)
    g = gaussian(1, 9, 1)[0]
    d = v @ g
    c = frog.coefficients(v @ v.T, d, method)
    assert c.shape == d.shape and c.dtype == d.dtype
    expected = {"sum": d, "mean": d / 4, "project": torch.linalg.solve(v @ v.T, d)}[method]
    torch.testing.assert_close(c, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(frog.combine(v, c), v.T @ c, rtol=1e-12, atol=1e-12)


def test_float32_jvps_keep_dtype():
    v = gaussian(3, 7, 0).float()
    g = gaussian(1, 7, 1)[0].float()
    est = frog.aggregate(v, v @ g, "project")
    assert est.dtype == torch.float32
    assert rel_err(est.double(), lstsq_projection(v.double(), g.double())) < 1e-5


# -- unbiasedness ----------------------------------------------------------------------------------
def test_single_tangent_forward_gradient_is_unbiased():
    """E[(v.g) v] = g for v ~ N(0, I) (Def. 1); checked within 5 standard errors per coordinate."""
    n, samples = 5, 20000
    g = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=F64)
    tangents = frog.sample_tangents(samples, n, kind="normal", generator=gen(2024), dtype=F64)
    d = tangents @ g
    singles = d[:, None] * tangents  # g_v = d v, one row per sample
    # the library's k = 1 estimate is g_v for every aggregation that is unbiased (sum = mean)
    for i in range(200):
        for method in ("sum", "mean"):
            est = frog.aggregate(tangents[i : i + 1], d[i : i + 1], method)
            torch.testing.assert_close(est, singles[i], rtol=1e-13, atol=1e-14)
    # the average of all samples is the mean aggregation over all of them
    mean = frog.aggregate(tangents, d, "mean")
    torch.testing.assert_close(mean, singles.mean(0), rtol=1e-10, atol=1e-12)
    stderr = singles.std(0) / math.sqrt(samples)
    assert bool(((mean - g).abs() <= 5 * stderr).all()), (mean, g, stderr)
    # Var of coordinate i is |g|^2 + g_i^2 (Gaussian 4th moments): the sample variance agrees
    expected_var = g.square().sum() + g.square()
    assert bool(((singles.var(0) / expected_var - 1).abs() < 0.1).all())


def test_single_tangent_forward_gradient_is_descent_direction():
    tangents = frog.sample_tangents(200, 6, generator=gen(1), dtype=F64)
    g = gaussian(1, 6, 2)[0]
    for method in METHODS:
        for t in tangents[:50]:
            est = frog.aggregate(t[None], (t @ g)[None], method)
            assert float(est @ g) >= -1e-12
            # parallel to v: est = alpha v
            torch.testing.assert_close(est, (est @ t) / (t @ t) * t, rtol=1e-10, atol=1e-12)


# -- scale correction ------------------------------------------------------------------------------
def expected_chi(m):
    """E[chi_m] from the Gamma function directly (small m)."""
    return math.sqrt(2.0) * math.gamma((m + 1) / 2) / math.gamma(m / 2)


@pytest.mark.parametrize("k,n", [(1, 2), (1, 10), (3, 10), (5, 20), (16, 64), (7, 8)])
def test_scale_correction_project_gamma(k, n):
    assert frog.scale_correction("project", k, n, float(n)) == pytest.approx(expected_chi(n) / expected_chi(k), rel=1e-12)


@pytest.mark.parametrize("k,n", [(8, 8), (9, 8), (100, 3)])
def test_scale_correction_project_is_one_when_k_ge_n(k, n):
    assert frog.scale_correction("project", k, n, float(n)) == 1.0


def test_scale_correction_project_monte_carlo():
    """E[chi_n] / E[chi_k] from sample mean norms of Gaussian vectors."""
    k, n, samples = 3, 12, 40000
    zn = torch.randn(samples, n, generator=gen(5), dtype=F64).norm(dim=1)
    zk = torch.randn(samples, k, generator=gen(6), dtype=F64).norm(dim=1)
    ratio = float(zn.mean() / zk.mean())
    # delta method: relative sd of the ratio
    rel_sd = math.sqrt(float(zn.var() / zn.mean() ** 2 + zk.var() / zk.mean() ** 2) / samples)
    assert abs(frog.scale_correction("project", k, n, float(n)) / ratio - 1) < 5 * rel_sd


@pytest.mark.parametrize("k,n", [(1, 10), (1, 50), (4, 50), (16, 64)])
@pytest.mark.parametrize("msq", [1.0, "n"])
def test_scale_correction_mean_and_sum_closed_form(k, n, msq):
    msq = float(n) if msq == "n" else msq
    c = math.sqrt(2 / (math.pi * n)) if k == 1 else math.sqrt((n + k) / (1 + k)) / n
    mean_factor = frog.scale_correction("mean", k, n, msq)
    assert mean_factor == pytest.approx(1 / (msq * c), rel=1e-12)
    # sum = k * mean, so after correction both have the same length
    assert frog.scale_correction("sum", k, n, msq) * k == pytest.approx(mean_factor, rel=1e-12)


def test_scale_correction_mean_k1_restores_length():
    """k = 1, N(0, I): E|d v| = |g| E[|z_1| |v|] ~ |g| sqrt(2 n / pi); the correction undoes it."""
    n, samples = 100, 20000
    v = torch.randn(samples, n, generator=gen(8), dtype=F64)
    g = gaussian(1, n, 9)[0]
    ratio = (v @ g).abs() * v.norm(dim=1) / g.norm()
    factor = frog.scale_correction("mean", 1, n, float(n))
    corrected = ratio * factor
    # O(1/n) approximation error plus 5 standard errors
    assert abs(float(corrected.mean()) - 1) < 0.03 + 5 * float(corrected.std()) / math.sqrt(samples)


def test_aggregate_correct_scale_applies_factor():
    k, n = 3, 10
    v = gaussian(k, n, 0)
    g = gaussian(1, n, 1)[0]
    d = v @ g
    for method in METHODS:
        plain = frog.aggregate(v, d, method)
        for normalized, msq in [(False, float(n)), (True, 1.0)]:
            corrected = frog.aggregate(v, d, method, correct_scale=True, normalized=normalized)
            torch.testing.assert_close(corrected, plain * frog.scale_correction(method, k, n, msq), rtol=1e-12, atol=1e-12)


def test_frog_norm_ratio_after_correction_is_one_on_average():
    """|P_U g| / |g| with Gaussian tangents has mean E[chi_k] / E[chi_n]; the correction makes it 1."""
    k, n, samples = 4, 24, 3000
    g = gaussian(1, n, 77)[0]
    generator = gen(78)
    plain, corrected = [], []
    for _ in range(samples):
        v = frog.sample_tangents(k, n, generator=generator, dtype=F64)
        plain.append(float(frog.aggregate(v, v @ g, "project").norm() / g.norm()))
        corrected.append(float(frog.aggregate(v, v @ g, "project", correct_scale=True).norm() / g.norm()))
    plain_t, corr_t = torch.tensor(plain, dtype=F64), torch.tensor(corrected, dtype=F64)
    se_plain = float(plain_t.std()) / math.sqrt(samples)
    se_corr = float(corr_t.std()) / math.sqrt(samples)
    assert abs(float(plain_t.mean()) - expected_chi(k) / expected_chi(n)) < 5 * se_plain
    assert abs(float(corr_t.mean()) - 1.0) < 5 * se_corr
    # and without the correction the length is clearly too short (about sqrt(k / n))
    assert float(plain_t.mean()) < 0.6


# -- errors ---------------------------------------------------------------------------------------
def test_aggregate_shape_mismatch():
    v = gaussian(3, 5, 0)
    with pytest.raises(ValueError, match=r"must agree in k.*\(3, 5\).*\(4,\)"):
        frog.aggregate(v, torch.ones(4, dtype=F64), "sum")
    with pytest.raises(ValueError, match="must agree in k"):
        frog.aggregate(v, torch.ones(2, 3, dtype=F64), "project")
    with pytest.raises(ValueError, match="must agree in k"):
        frog.aggregate(v, torch.tensor(1.0, dtype=F64), "mean")


@pytest.mark.parametrize("gram", [None, torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)[:, :2], torch.ones(3, dtype=F64)])
def test_project_wrong_gram_shape(gram):
    with pytest.raises(ValueError, match=r"project needs a Gram matrix of shape \(3, 3\)"):
        frog.coefficients(gram, torch.ones(3, dtype=F64), "project")


def test_jvps_must_be_1d_or_2d():
    with pytest.raises(ValueError, match=r"jvps must have shape \(k,\) or \(k, B\)"):
        frog.coefficients(None, torch.ones(2, 2, 2, dtype=F64), "sum")


def test_unknown_aggregation_lists_methods():
    for call in (
        lambda: frog.aggregate(gaussian(2, 3, 0), torch.ones(2, dtype=F64), "median"),
        lambda: frog.coefficients(None, torch.ones(2, dtype=F64), "median"),
        lambda: frog.scale_correction("median", 2, 3, 3.0),
    ):
        with pytest.raises(ValueError, match=r"unknown aggregation 'median'; choose one of sum, mean, project"):
            call()


# -- batched project ------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), samples=st.integers(1, 4), n=st.integers(1, 7), data=st.data())
def test_batched_project_matches_least_squares(seed, samples, n, data):
    from frog.aggregation import project

    k = data.draw(st.integers(1, n + 2))
    v = torch.randn(samples, k, n, generator=gen(seed), dtype=F64)
    g = torch.randn(samples, n, generator=gen(seed + 1), dtype=F64)
    d = torch.einsum("skn,sn->sk", v, g)
    est = project(v, d)
    assert est.shape == (samples, n)
    for s in range(samples):
        assert rel_err(est[s], lstsq_projection(v[s], g[s])) < 1e-7
        assert rel_err(est[s], frog.aggregate(v[s], d[s], "project")) < 1e-9


def test_batched_project_shape_mismatch():
    from frog.aggregation import project

    with pytest.raises(ValueError, match="must agree"):
        project(torch.ones(2, 3, 4, dtype=F64), torch.ones(2, 4, dtype=F64))
