"""Approximation quality (the paper's Fig. 3; with angle tangents Fig. 5 left).

Results: docs/reproducing.md, "Approximation quality (Fig. 3)" and "Tangents at a fixed angle (Fig. 5)".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..quality import approximation_quality, mean_and_ci
from ..tangents import check_kind, sample_tangents
from ..training.results import CsvLog, Row, text

COLUMNS = ["n", "k", "method", "normalized", "cosine_mean", "cosine_ci", "norm_ratio_mean", "norm_ratio_ci",
           "angle", "samples", "sampler", "true_gradient", "seed"]
TRUE_GRADIENTS = ("ones", "random")
CHUNK_ELEMENTS = 1 << 25  # tangent entries drawn at once (samples are processed in chunks)


def true_gradient(kind: str, n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The known gradient g (n,): all ones, or N(0, I) drawn from ``generator``."""
    if kind == "ones":
        return torch.ones(n, dtype=dtype)
    if kind == "random":
        return torch.randn(n, generator=generator, dtype=dtype)
    raise ValueError(f"unknown true gradient {kind!r}; choose one of {', '.join(TRUE_GRADIENTS)}")


def sweep(
    dims: Sequence[int],
    tangents: Sequence[int],
    samples: int,
    *,
    sampler: str = "normal",
    angles: Sequence[float] | None = None,
    gradient: str = "ones",
    seed: int = 0,
    out_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[Row]:
    """Rows of mean and 95% CI of cosine similarity and norm ratio, per (n, angle, k, method).

    For each n (and angle) one draw of max(k) tangents per sample is shared by all methods and k.
    Rows are appended to ``out_dir/approximation.csv`` as each n is done.
    """
    if samples < 1 or any(n < 1 for n in dims) or any(k < 1 for k in tangents):
        raise ValueError("samples, dimensions n and tangent counts k must all be >= 1")
    if gradient not in TRUE_GRADIENTS:
        raise ValueError(f"unknown true gradient {gradient!r}; choose one of {', '.join(TRUE_GRADIENTS)}")
    if sampler == "angle" and angles is None:
        raise ValueError("sampler='angle' needs angles= (degrees, in (0, 90])")
    angle_list: list[float | None] = list(angles or []) if sampler == "angle" else [None]
    for angle in angle_list:
        check_kind(sampler, angle)
    log = CsvLog(out_dir / "approximation.csv", COLUMNS) if out_dir is not None else None
    max_k = max(tangents)
    for n in tqdm(dims, desc="approx", disable=not progress, unit="n"):
        for angle in angle_list:
            setting = {"n": n, "angle": angle, "samples": samples, "sampler": sampler,
                       "true_gradient": gradient, "seed": seed}
            earlier = [r for r in (log.rows if log else []) if all(r[c] == text(v) for c, v in setting.items())]
            if earlier:  # done by an earlier run of the same command: resume after it
                yield from earlier
                continue
            generator = torch.Generator().manual_seed(seed)
            grad = true_gradient(gradient, n, generator, dtype)
            chunk = max(1, min(samples, CHUNK_ELEMENTS // (max_k * n)))
            parts = []
            for start in range(0, samples, chunk):
                drawn = sample_tangents(max_k, n, sampler, angle=angle, batch=min(chunk, samples - start),
                                        generator=generator, dtype=dtype)
                parts.append(approximation_quality(drawn, grad, tangents))
            for i, first in enumerate(parts[0]):
                cosine = mean_and_ci(torch.cat([part[i].cosine for part in parts]))
                ratio = mean_and_ci(torch.cat([part[i].norm_ratio for part in parts]))
                row = {
                    **setting, "k": first.k, "method": first.method, "normalized": first.normalized,
                    "cosine_mean": cosine[0], "cosine_ci": cosine[1],
                    "norm_ratio_mean": ratio[0], "norm_ratio_ci": ratio[1],
                }
                if log is not None:
                    log.append(row)
                yield row
