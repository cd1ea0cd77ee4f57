"""Aggregation of k jvps into one estimate (the paper's Def. 2 and 5; the one idea of docs/architecture.md).

Every estimator is a vector in span(V): an aggregation returns k coefficients c and the estimate is
V^T c (tangents V stored k x n, jvps d = V grad f):

- ``sum``:     c = d                      (sum of the single-tangent forward gradients d_i v_i)
- ``mean``:    c = d / k
- ``project``: c solves G c = d, G = V V^T, so V^T c = V^T (V V^T)^+ V grad f = P_U(grad f),
  the orthogonal projection of the gradient onto U = span(V) ("frog").

``project`` uses a Cholesky solve of the Gram matrix when it is well conditioned and otherwise a
spectral (eigh) least-squares solve that drops the null space, so k > n and linearly dependent
tangents still give the orthogonal projection (any solution of G c = d gives the same V^T c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layouts import combine, gram_of
from .tangents import TangentPlan, mean_squared_norm

METHODS = ("sum", "mean", "project")


def check_method(method: str) -> None:
    """Raise ValueError for an unknown aggregation name."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Aggregator:
    """Turns a step's jvps into coefficients on its plan's *raw* tangents W: estimate = W^T c_W.

    With tangents V = T W (a sampler's mixing T, :meth:`frog.tangents.TangentPlan.transform`):
    d_V = T d_W, G_V = T G_W T^T, c_V from :func:`coefficients` (``method``), times the length
    correction :func:`scale_correction` when ``length_correction``, and c_W = T^T c_V.

    Args:
        method: ``sum``, ``mean`` or ``project``.
        num_tangents: k.
        sampler: the tangents' sampler (for the correction's E|v|^2).
        normalize: whether the tangents are normalized (E|v|^2 = 1).
        length_correction: multiply by the correction (not with guesses, whose components have the
            gradient's length; input-span tangents span less than n: the correction uses the plan's span).
        rtol: eigenvalue cut-off of the Gram solve.
    """

    method: str
    num_tangents: int
    sampler: str = "normal"
    normalize: bool = False
    length_correction: bool = False
    rtol: float | None = None

    def __call__(self, plan: TangentPlan, raw_jvps: torch.Tensor) -> torch.Tensor:
        """Coefficients c_W (k,) or (k, B) for raw jvps (k,) or (k, B)."""
        transform = plan.transform()
        jvps = raw_jvps if transform is None else (transform @ raw_jvps.double()).to(raw_jvps.dtype)
        gram = None
        if self.method == "project":
            gram = plan.gram() if transform is None else transform @ plan.gram() @ transform.T
        coeffs = coefficients(gram, jvps, self.method, rtol=self.rtol)
        if self.length_correction:
            n = plan.spanned_dimension()
            mean_sq = mean_squared_norm(self.sampler, self.normalize, n)
            coeffs = coeffs * scale_correction(self.method, self.num_tangents, n, mean_sq)
        if transform is not None:
            coeffs = (transform.T @ coeffs.double()).to(coeffs.dtype)
        return coeffs


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, rtol: float) -> torch.Tensor:
    """A solution of G c = rhs for symmetric PSD G (..., k, k), rhs (..., k, m), in G's dtype.

    Cholesky when every pivot satisfies min diag(L)^2 > rtol * max diag(G) (diag(L)_i^2 bounds
    lambda_min from above, so a smaller pivot proves near-singularity); otherwise the pseudo-inverse
    solution via eigh, with eigenvalues below rtol * lambda_max treated as zero.
    """
    lower, info = torch.linalg.cholesky_ex(gram)
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1)
    if bool((info == 0).all()):
        pivots = lower.diagonal(dim1=-2, dim2=-1).square().amin(-1)
        if bool((pivots > rtol * scale).all()):
            return torch.cholesky_solve(rhs, lower)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    cutoff = rtol * eigenvalues.amax(-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    keep = eigenvalues > cutoff
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
    return eigenvectors @ (inverse.unsqueeze(-1) * (eigenvectors.mT @ rhs))


def default_rtol(num_tangents: int) -> float:
    """Relative eigenvalue cut-off of the (float64) Gram solve: 10 k eps(float64)."""
    return 10.0 * num_tangents * torch.finfo(torch.float64).eps


def coefficients(
    gram: torch.Tensor | None,
    jvps: torch.Tensor,
    method: str = "project",
    *,
    rtol: float | None = None,
) -> torch.Tensor:
    """Coefficients c (same shape and dtype as ``jvps``) with estimate V^T c.

    Args:
        gram: G = V V^T, shape (k, k), or (B, k, k) for per-example tangents (one Gram matrix per
            sample, which then solves its own column of ``jvps``); only ``project`` reads it.
        jvps: d = V grad f, shape (k,) or (k, B) for B per-sample gradients.
        method: ``sum`` (c = d), ``mean`` (c = d / k) or ``project`` (G c = d).
        rtol: relative eigenvalue cut-off for rank-deficient G (default :func:`default_rtol`).
    """
    check_method(method)
    if jvps.dim() not in (1, 2):
        raise ValueError(f"jvps must have shape (k,) or (k, B), got {tuple(jvps.shape)}")
    k = jvps.shape[0]
    if method == "sum":
        return jvps
    if method == "mean":
        return jvps / k
    rtol = default_rtol(k) if rtol is None else rtol
    if gram is not None and gram.dim() == 3 and jvps.dim() == 2 and gram.shape == (jvps.shape[1], k, k):
        rhs = jvps.to(torch.float64).T.unsqueeze(-1)  # (B, k, 1): sample j solves G_j c_j = d_j
        return solve_gram(gram.to(torch.float64), rhs, rtol).squeeze(-1).T.to(jvps.dtype)
    if gram is None or gram.shape != (k, k):
        got = None if gram is None else tuple(gram.shape)
        raise ValueError(f"project needs a Gram matrix of shape ({k}, {k}) (or (B, {k}, {k}) for jvps (k, B)) "
                         f"for {k} jvps, got {got}")
    rhs = jvps.to(torch.float64).reshape(k, -1)
    solution = solve_gram(gram.to(torch.float64), rhs, rtol)
    return solution.reshape(jvps.shape).to(jvps.dtype)


def project(tangents: torch.Tensor, jvps: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """Batched frog: P_U(grad) = V^T c with G c = d, independently for each leading index.

    Args:
        tangents: V, shape (..., k, n).
        jvps: d = V grad, shape (..., k).
    Returns:
        (..., n), in the tangents' dtype (the Gram solve runs in float64).
    """
    if tangents.dim() < 2 or tangents.shape[:-1] != jvps.shape:
        raise ValueError(
            f"tangents (..., k, n) and jvps (..., k) must agree, got {tuple(tangents.shape)} and {tuple(jvps.shape)}"
        )
    k = tangents.shape[-2]
    rtol = default_rtol(k) if rtol is None else rtol
    solution = solve_gram(gram_of(tangents), jvps.to(torch.float64).unsqueeze(-1), rtol)
    return (tangents.mT @ solution.to(tangents.dtype)).squeeze(-1)


def _expected_chi(m: int) -> float:
    """E[chi_m] = sqrt(2) Gamma((m + 1) / 2) / Gamma(m / 2), the mean norm of N(0, I_m)."""
    return math.sqrt(2.0) * math.exp(math.lgamma((m + 1) / 2) - math.lgamma(m / 2))


def scale_correction(method: str, num_tangents: int, dimension: int, mean_squared_norm: float) -> float:
    """The authors' length correction factor; multiply the coefficients by it.

    project: E[chi_n] / E[chi_k] (1 when k >= n). mean: 1 / (E|v|^2 c) with
    c = sqrt(2 / (pi n)) for k = 1 and c = sqrt((n + k) / (1 + k)) / n for k > 1. sum: the mean's
    factor divided by k (sum = k mean, so both end at the same length). It gives the estimate the
    gradient's expected length (docs/guides/training-loop.md, "Optimizer notes").
    """
    check_method(method)
    k, n = num_tangents, dimension
    if method == "project":
        return 1.0 if k >= n else _expected_chi(n) / _expected_chi(k)
    c = math.sqrt(2.0 / (math.pi * n)) if k == 1 else math.sqrt((n + k) / (1 + k)) / n
    factor = 1.0 / (mean_squared_norm * c)
    return factor / k if method == "sum" else factor


def aggregate(
    tangents: torch.Tensor,
    jvps: torch.Tensor,
    method: str = "project",
    *,
    correct_scale: bool = False,
    normalized: bool = False,
    rtol: float | None = None,
) -> torch.Tensor:
    """The estimate V^T c from explicit tangents.

    Args:
        tangents: V, shape (k, *shape) (e.g. (k, n)).
        jvps: d = V grad f, shape (k,) or (k, B).
        method: ``sum``, ``mean`` or ``project`` (frog).
        correct_scale: apply :func:`scale_correction` (for N(0, I) tangents, or unit ones
            when ``normalized``).
    Returns:
        (*shape) for jvps (k,), (*shape, B) for jvps (k, B).
    """
    if tangents.dim() < 1 or jvps.dim() < 1 or tangents.shape[0] != jvps.shape[0]:
        raise ValueError(
            f"tangents (k, *shape) and jvps (k,) or (k, B) must agree in k, got tangents "
            f"{tuple(tangents.shape)} and jvps {tuple(jvps.shape)}"
        )
    flat = tangents.reshape(tangents.shape[0], -1)
    gram = gram_of(flat.double()) if method == "project" else None
    coeffs = coefficients(gram, jvps, method, rtol=rtol)
    if correct_scale:
        n = flat.shape[1]
        coeffs = coeffs * scale_correction(method, flat.shape[0], n, 1.0 if normalized else float(n))
    return combine(tangents, coeffs)
