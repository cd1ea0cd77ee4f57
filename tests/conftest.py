"""Shared helpers for the frog test suite.

Everything here is independent math (least squares, pseudo-inverses, autograd) that the tests
compare the library against; nothing here calls frog.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "frog",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# HYPOTHESIS_PROFILE=explore: random (not derandomized) and many more examples, for a deeper search
settings.register_profile("explore", parent=settings.get_profile("frog"), derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "frog"))

KINDS_AND_ANGLES = [
    ("normal", None),
    ("rademacher", None),
    ("basis", None),
    ("orthonormal", None),
    ("angle", 45.0),
]


def gen(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def projection_matrix(tangents: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector (n, n) onto the row space of tangents (k, n), via the pseudo-inverse."""
    flat = tangents.reshape(tangents.shape[0], -1).double()
    return torch.linalg.pinv(flat) @ flat


def lstsq_projection(tangents: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """V^T argmin_c |V^T c - g| (least squares with torch.linalg.lstsq, gelsd driver)."""
    flat = tangents.reshape(tangents.shape[0], -1).double()
    c = torch.linalg.lstsq(flat.T, g.reshape(-1, 1).double(), driver="gelsd").solution
    return (flat.T @ c).reshape(g.shape)


def autograd_grad(fn, x: torch.Tensor) -> torch.Tensor:
    """The exact gradient of a scalar fn at x by reverse-mode autograd."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / max(|b|, tiny)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
