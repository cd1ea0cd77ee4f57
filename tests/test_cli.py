"""The frog command line end to end on tiny settings, and its one-line errors."""

from __future__ import annotations

import csv
import math

import pytest

from frog.cli import main

APPROX_COLUMNS = ["n", "k", "method", "normalized", "cosine_mean", "cosine_ci", "norm_ratio_mean", "norm_ratio_ci"]
OPT_COLUMNS = ["function", "n", "method", "k", "seed", "lr", "best_value", "final_value", "steps"]


def read(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


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


def test_optimize_writes_rows_summary_and_resumes(tmp_path):
    args = ["optimize", "--function", "sphere", "--dims", "4", "-k", "1", "2", "--methods", "bp", "fg-mean", "frog",
            "--seeds", "0", "--steps", "30", "--out", str(tmp_path)]
    assert main(args) == 0
    header, rows = read(tmp_path / "optimization.csv")
    assert header[: len(OPT_COLUMNS)] == OPT_COLUMNS
    # bp once, fg-mean for k = 1 and 2, frog for k = 2 (frog k = 1 is the fg-mean k = 1 baseline)
    assert sorted((r["method"], r["k"]) for r in rows) == [("bp", ""), ("fg-mean", "1"), ("fg-mean", "2"), ("frog", "2")]
    assert all(float(r["best_value"]) < 4.0 for r in rows)  # sphere starts at f = n = 4
    assert (tmp_path / "optimization_summary.csv").exists() and (tmp_path / "optimization.png").exists()
    assert main(args) == 0
    assert read(tmp_path / "optimization.csv")[1] == rows


def test_optimize_engines_agree(tmp_path):
    best = {}
    for engine in ("jvp", "sim"):
        out = tmp_path / engine
        assert main(["optimize", "--function", "rosenbrock", "--dims", "8", "-k", "4", "--methods", "frog",
                     "--seeds", "3", "--steps", "50", "--engine", engine, "--out", str(out)]) == 0
        best[engine] = float(read(out / "optimization.csv")[1][0]["best_value"])
    assert best["jvp"] == pytest.approx(best["sim"], rel=1e-4)


def test_optimize_divergence_is_recorded(tmp_path):
    assert main(["optimize", "--function", "rosenbrock", "--dims", "4", "-k", "2", "--methods", "fg-mean",
                 "--seeds", "0", "--steps", "200", "--lr", "10", "--out", str(tmp_path)]) == 0
    row = read(tmp_path / "optimization.csv")[1][0]
    assert row["diverged"] == "true"
    assert int(row["steps"]) < 200
    assert math.isfinite(float(row["best_value"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimize", "--dims", "3", "-k", "16"], "no step size"),
        (["optimize", "-k", "0"], ">= 1"),
        (["optimize", "--dims", "0"], ">= 1"),
        (["optimize", "--function", "ackley"], "unknown function"),
        (["optimize", "--methods", "adam"], "unknown method"),
        (["optimize", "--sampler", "angle", "--angles", "0"], "(0, 90]"),
        (["approx", "--sampler", "angle", "--angles", "91"], "(0, 90]"),
        (["approx", "-k", "0"], ">= 1"),
        (["approx", "--dims", "0"], ">= 1"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["approx", "--dims", "2", "-k", "1", "--samples", "2", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write to the output folder" in err and "\n" not in err


def test_missing_step_size_names_the_combination(capsys, tmp_path):
    assert main(["optimize", "--function", "sphere", "--dims", "5", "-k", "2", "--methods", "frog",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "function=sphere" in err and "n=5" in err and "frog" in err and "--lr" in err
