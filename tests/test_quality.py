"""How well estimates approximate a known gradient (frog.quality): cosine, norm ratio, mean and 95% CI, and
every method of approximation_quality against estimates formed by hand (least squares, sums of v v^T g)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import gen, lstsq_projection

from frog.quality import approximation_quality, cosine_similarity, mean_and_ci, norm_ratio

F64 = torch.float64


def test_cosine_and_norm_ratio():
    grad = torch.tensor([3.0, 4.0], dtype=F64)
    estimates = torch.tensor([[[6.0, 8.0], [-3.0, -4.0]], [[4.0, -3.0], [0.0, 0.0]]], dtype=F64)  # (2, 2, n)
    torch.testing.assert_close(cosine_similarity(estimates, grad), torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(norm_ratio(estimates, grad), torch.tensor([[2.0, 1.0], [1.0, 0.0]], dtype=F64))
    g = torch.randn(7, generator=gen(0), dtype=F64)
    e = torch.randn(4, 7, generator=gen(1), dtype=F64)
    torch.testing.assert_close(cosine_similarity(e, g), torch.nn.functional.cosine_similarity(e, g.expand(4, 7)))


def test_mean_and_ci_is_the_normal_95_percent_interval():
    values = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.6], dtype=F64)
    mean, half = mean_and_ci(values)
    plain = values.tolist()
    assert mean == pytest.approx(statistics.mean(plain))
    assert half == pytest.approx(1.96 * statistics.stdev(plain) / math.sqrt(5))
    assert mean_and_ci(torch.tensor([0.7])) == (pytest.approx(0.7), 0.0)


def by_hand(tangents: torch.Tensor, grad: torch.Tensor, method: str, normalized: bool, k: int) -> torch.Tensor:
    """Each sample's estimate (S, n) from its first k tangents, by least squares or by explicit sums."""
    out = []
    for v in tangents:
        if method == "frog":
            out.append(lstsq_projection(v[: min(k, v.shape[1])], grad))
            continue
        weights = [float(v[i] @ grad) / (float(v[i] @ v[i]) if normalized else 1.0) for i in range(k)]
        total = sum(w * v[i] for i, w in enumerate(weights))
        out.append(total / k if method == "mean" else total)
    return torch.stack(out)


def test_every_method_against_estimates_by_hand():
    samples, max_k, n = 4, 7, 5
    tangents = torch.randn(samples, max_k, n, generator=gen(2), dtype=F64)
    grad = torch.randn(n, generator=gen(3), dtype=F64)
    ks = [1, 3, 5, 7]
    results = approximation_quality(tangents, grad, ks)
    expected_keys = {("frog", False, k) for k in ks} | {("baseline", False, 1)} | {
        (m, z, k) for m in ("sum", "mean") for z in (False, True) for k in ks}
    assert sorted((q.method, q.normalized, q.k) for q in results) == sorted(expected_keys)
    for q in results:
        method = "sum" if q.method == "baseline" else q.method
        estimate = by_hand(tangents, grad, method, q.normalized, q.k)
        cos = torch.nn.functional.cosine_similarity(estimate, grad.expand_as(estimate), dim=1)
        torch.testing.assert_close(q.cosine, cos, msg=f"{q.method} {q.normalized} {q.k}")
        torch.testing.assert_close(q.norm_ratio, estimate.norm(dim=1) / grad.norm(), msg=f"{q.method} {q.k}")
    for q in results:
        if q.method == "frog" and q.k >= n:  # exact from k = n on
            torch.testing.assert_close(q.cosine, torch.ones(samples, dtype=F64))
            torch.testing.assert_close(q.norm_ratio, torch.ones(samples, dtype=F64))


def test_too_few_tangents_is_an_error():
    with pytest.raises(ValueError, match="tangents hold 3 per sample, fewer than k = 4"):
        approximation_quality(torch.ones(2, 3, 5), torch.ones(5), [1, 4])
