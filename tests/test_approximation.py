"""Approximation quality (frog.experiments.approximation, frog approx): the rows of a sweep against
cosines computed here by least squares, and the command's CSV, plot and resume."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import lstsq_projection

from frog.cli import main
from frog.experiments import approximation
from frog.experiments.approximation import sweep, true_gradient
from frog.tangents import sample_tangents
from frog.training.results import read_csv as read

F64 = torch.float64
APPROX_COLUMNS = ["n", "k", "method", "normalized", "cosine_mean", "cosine_ci", "norm_ratio_mean", "norm_ratio_ci"]


def test_approx_writes_csv_and_plot(tmp_path):
    assert main(["approx", "--dims", "8", "-k", "1", "2", "8", "16", "--samples", "40", "--out", str(tmp_path)]) == 0
    header, rows = read(tmp_path / "approximation.csv")
    assert header[: len(APPROX_COLUMNS)] == APPROX_COLUMNS
    assert (tmp_path / "approximation.png").stat().st_size > 1000
    assert {r["method"] for r in rows} == {"baseline", "frog", "mean", "sum"}
    assert {r["normalized"] for r in rows} == {"true", "false"}
    assert all(r["k"] == "1" for r in rows if r["method"] == "baseline")
    for k in ("8", "16"):  # k >= n: frog is the exact gradient
        frog = next(r for r in rows if r["method"] == "frog" and r["k"] == k)
        assert float(frog["cosine_mean"]) > 0.99999
        assert abs(float(frog["norm_ratio_mean"]) - 1) < 1e-4
    for k in ("2", "8"):
        for normalized in ("true", "false"):
            s, m = (next(r for r in rows if r["method"] == meth and r["k"] == k and r["normalized"] == normalized)
                    for meth in ("sum", "mean"))
            assert float(s["cosine_mean"]) == pytest.approx(float(m["cosine_mean"]), abs=1e-6)
            assert float(s["norm_ratio_mean"]) == pytest.approx(int(k) * float(m["norm_ratio_mean"]), rel=1e-5)


def test_approx_rerun_resumes_without_duplicates(tmp_path):
    args = ["approx", "--dims", "4", "-k", "1", "4", "--samples", "10", "--out", str(tmp_path)]
    assert main(args) == 0
    first = read(tmp_path / "approximation.csv")[1]
    assert main(args) == 0
    assert read(tmp_path / "approximation.csv")[1] == first


def test_approx_angle_sampler_has_angle_column(tmp_path):
    assert main(["approx", "--dims", "16", "-k", "4", "16", "--samples", "30", "--sampler", "angle",
                 "--angles", "15", "90", "--out", str(tmp_path)]) == 0
    header, rows = read(tmp_path / "approximation.csv")
    assert "angle" in header
    assert {float(r["angle"]) for r in rows} == {15.0, 90.0}
    frog = {float(r["angle"]): float(r["cosine_mean"]) for r in rows if r["method"] == "frog" and r["k"] == "4"}
    mean = {float(r["angle"]): float(r["cosine_mean"]) for r in rows if r["method"] == "mean" and r["k"] == "4"
            and r["normalized"] == "false"}
    assert frog[15.0] == pytest.approx(frog[90.0], abs=1e-5)  # frog depends on the span only
    assert mean[15.0] < mean[90.0]


def test_true_gradient():
    assert torch.equal(true_gradient("ones", 3, torch.Generator(), F64), torch.ones(3, dtype=F64))
    drawn = true_gradient("random", 5, torch.Generator().manual_seed(4), F64)
    assert torch.equal(drawn, torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=F64))
    with pytest.raises(ValueError, match="unknown true gradient 'zeros'; choose one of ones, random"):
        true_gradient("zeros", 3, torch.Generator(), F64)


def by_hand(drawn: torch.Tensor, grad: torch.Tensor, method: str, k: int) -> list[float]:
    """Per-sample cosine of frog (least squares) or mean (sum of (v . g) v / k) from the first k tangents."""
    cosines = []
    for v in drawn:
        estimate = lstsq_projection(v[:k], grad) if method == "frog" else (v[:k].T @ (v[:k] @ grad)) / k
        cosines.append(float(estimate @ grad / (estimate.norm() * grad.norm())))
    return cosines


@pytest.mark.parametrize("chunk_samples", [None, 4])
def test_sweep_rows_are_the_mean_and_ci_of_each_samples_cosine(monkeypatch, chunk_samples):
    """One shared draw per n for all methods and k (in chunks of samples when they are many); each row's
    cosine is the mean and 1.96 std / sqrt(S) of the per-sample cosines, computed here by least squares."""
    samples, n, ks, seed = 10, 6, [1, 3, 6], 2
    if chunk_samples:
        monkeypatch.setattr(approximation, "CHUNK_ELEMENTS", chunk_samples * max(ks) * n)
    rows = list(sweep([n], ks, samples, gradient="random", seed=seed, dtype=F64, progress=False))
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=generator, dtype=F64)
    sizes = [samples] if not chunk_samples else [4, 4, 2]
    drawn = torch.cat([sample_tangents(max(ks), n, batch=size, generator=generator, dtype=F64) for size in sizes])
    assert len(rows) == 6 + 5 + 5  # k = 1 also has the baseline
    for k in ks:
        for method in ("frog", "mean"):
            (row,) = [r for r in rows if r["k"] == k and r["method"] == method and not r["normalized"]]
            cosines = by_hand(drawn, grad, method, k)
            assert row["cosine_mean"] == pytest.approx(statistics.mean(cosines), rel=1e-10)
            assert row["cosine_ci"] == pytest.approx(1.96 * statistics.stdev(cosines) / math.sqrt(samples), rel=1e-8,
                                                     abs=1e-12)
            assert (row["n"], row["samples"], row["sampler"], row["true_gradient"], row["seed"]) == (
                n, samples, "normal", "random", seed)
    (exact,) = [r for r in rows if r["k"] == 6 and r["method"] == "frog"]
    assert exact["cosine_mean"] == pytest.approx(1.0) and exact["norm_ratio_mean"] == pytest.approx(1.0)


def test_sweep_bad_arguments():
    for dims, ks, samples in (([0], [1], 2), ([2], [0], 2), ([2], [1], 0)):
        with pytest.raises(ValueError, match="must all be >= 1"):
            list(sweep(dims, ks, samples, progress=False))
    with pytest.raises(ValueError, match="unknown true gradient 'zeros'"):
        list(sweep([2], [1], 2, gradient="zeros", progress=False))
    with pytest.raises(ValueError, match="sampler='angle' needs angles="):
        list(sweep([2], [1], 2, sampler="angle", progress=False))
