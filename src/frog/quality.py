"""How well estimates approximate a known gradient: cosine similarity and norm ratio (the paper's Fig. 3;
docs/reproducing.md, "Approximation quality (Fig. 3)").

:func:`approximation_quality` evaluates every method on one shared draw of tangents, batched over
samples; the Gram matrix is formed once for the largest k and sliced for the smaller ones (nested
tangent sets), so the cost is one batched product plus one batched solve per k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .aggregation import default_rtol, solve_gram
from .layouts import gram_of


def cosine_similarity(estimates: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """<g_hat, g> / (|g_hat| |g|) for estimates (..., n) and grad (n,): shape (...)."""
    return (estimates @ grad) / (estimates.norm(dim=-1) * grad.norm()).clamp_min(torch.finfo(grad.dtype).tiny)


def norm_ratio(estimates: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|g_hat| / |g| for estimates (..., n) and grad (n,): shape (...)."""
    return estimates.norm(dim=-1) / grad.norm()


def mean_and_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96 std / sqrt(samples) over the last dimension."""
    samples = values.shape[-1]
    std = float(values.std()) if samples > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(samples)


@dataclass(frozen=True)
class Quality:
    """Per-sample metrics of one (method, normalized, k): tensors of shape (S,)."""

    method: str
    normalized: bool
    k: int
    cosine: torch.Tensor
    norm_ratio: torch.Tensor


def approximation_quality(tangents: torch.Tensor, grad: torch.Tensor, ks: Sequence[int]) -> list[Quality]:
    """Metrics of baseline (k = 1), frog, mean and sum (with and without normalized tangents).

    Args:
        tangents: one draw V, shape (S, K, n) with K >= max(ks); method k uses rows :k.
        grad: the true gradient g, shape (n,).
        ks: numbers of tangents. frog uses the first min(k, n) tangents (it is exact at k = n).
    """
    samples, max_k, n = tangents.shape
    if max(ks) > max_k:
        raise ValueError(f"tangents hold {max_k} per sample, fewer than k = {max(ks)}")
    jvps = tangents @ grad  # (S, K)
    # sum: sum_i d_i v_i; with normalized tangents: sum_i (d_i / |v_i|) (v_i / |v_i|)
    weights = torch.stack([jvps, jvps / torch.linalg.vector_norm(tangents, dim=-1).square()], dim=1)  # (S, 2, K)
    gram = gram_of(tangents[:, : min(max_k, n)])  # (S, m, m), nested: rows :k give k's Gram
    results = []
    frog_by_rank: dict[int, torch.Tensor] = {}  # k >= n all give the exact gradient: solve once
    sums = torch.zeros(samples, 2, n, dtype=tangents.dtype, device=tangents.device)
    done = 0
    for k in sorted(set(ks)):
        sums = sums + weights[:, :, done:k] @ tangents[:, done:k]  # running sums over tangents :k
        done = k
        m = min(k, n)
        if m not in frog_by_rank:
            coeffs = solve_gram(gram[:, :m, :m], jvps[:, :m].double().unsqueeze(-1), default_rtol(m))
            frog_by_rank[m] = (tangents[:, :m].mT @ coeffs.to(tangents.dtype)).squeeze(-1)
        estimates = {("frog", False): frog_by_rank[m]}
        if k == 1:
            estimates[("baseline", False)] = sums[:, 0]
        for normalized in (False, True):
            estimates[("sum", normalized)] = sums[:, int(normalized)]
            estimates[("mean", normalized)] = sums[:, int(normalized)] / k
        for (method, normalized), estimate in estimates.items():
            results.append(Quality(method, normalized, k, cosine_similarity(estimate, grad), norm_ratio(estimate, grad)))
    return results
