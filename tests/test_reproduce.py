"""frog reproduce end to end on tiny settings: every file and a report with the claims table."""

from __future__ import annotations

import csv

from frog.experiments.networks import NetworkRuns
from frog.experiments.reproduce import Settings, reproduce

TINY = Settings(
    name="tiny", note="Tiny settings for the test suite.",
    approx_dims=[64], approx_samples=60, angle_samples=60,
    opt_dims=[4, 16], opt_tangents=[1, 16], opt_seeds=[0], angle_seeds=[0],
    steps={"sphere": 40, "rosenbrock": 40, "styblinski-tang": 40},
    networks=(NetworkRuns(["digits"], [256], [("bp", None), ("frog", 4)], [0], epochs=1),
              NetworkRuns(["digits"], [256], [("frog-guess", 4), ("local", None)], [0], epochs=1),
              NetworkRuns(["digits"], [None], [("frog", 4)], [0], epochs=1, model="resnet18", images=64),
              NetworkRuns(["digits"], [None], [("bp", None)], [0], epochs=1, model="vit", images=64)),
)


def test_reproduce_writes_report_figures_and_tables(tmp_path):
    report = reproduce(tmp_path, TINY, engine="sim")
    text = report.read_text()
    for figure in ("approximation/approximation.png", "angles/approximation.png", "optimization/optimization.png"):
        assert f"]({figure})" in text
        assert (tmp_path / figure).stat().st_size > 1000
    for table in ("approximation/approximation.csv", "angles/approximation.csv", "optimization/optimization.csv",
                  "optimization/optimization_summary.csv", "angle_optimization/optimization.csv"):
        assert (tmp_path / table).exists()
    assert "Tiny settings" in text
    paper = text.split("## Beyond the paper")[0]
    claims = [line for line in paper.splitlines() if line.startswith("| ") and (" yes |" in line or " **no** |" in line or " partly |" in line)]
    assert len(claims) == 6  # five analysis claims and the gap to backprop on networks
    # frog is exact at k = n and beats the conical combinations: true for any number of samples
    assert any("exact at k = n" in line and " yes |" in line for line in claims)
    assert any("nearly parallel" in line and " yes |" in line for line in claims)
    assert "| digits | 256 | frog | 4 | 0 | 1 |" in text
    assert (tmp_path / "networks" / "summary.csv").exists()
    assert (tmp_path / "networks" / "digits_w256_frog_k4_s0" / "metrics.csv").exists()
    # Table I networks: their own table (one step on 64 images each), not part of the FC claims
    assert "## ResNet18 and ViT (Sec. 4.5, Table I)" in text
    assert "| digits | resnet18 | frog | 4 | 0 | 1 |" in text and "| digits | vit | bp | – | 0 | 1 |" in text
    assert (tmp_path / "networks" / "digits_resnet18_frog_k4_s0_n64" / "metrics.csv").exists()
    # the optimization table has one row per (function, n)
    assert sum(line.startswith(("| sphere |", "| rosenbrock |", "| styblinski-tang |")) for line in text.splitlines()) == 6

    # beyond the paper: frog with guesses against local learning with the same heads, outside the paper's claims
    assert "## Beyond the paper: guessed tangents and local learning" in text
    rows = {r["method"]: float(r["test_accuracy"]) for r in csv.DictReader((tmp_path / "networks" / "summary.csv").open())
            if r["model"] == "fc"}
    verdict = "tied" if abs(rows["frog-guess"] - rows["local"]) < 1e-3 else (
        "yes" if rows["frog-guess"] > rows["local"] else "**no**")
    line = next(line for line in text.splitlines() if line.startswith("| frog with guesses beats local learning"))
    assert f"| {verdict} | test accuracy {rows['frog-guess']:.4f} against {rows['local']:.4f} |" in line
    assert f"| digits | 256 | {rows['bp']:.4f} | – | {rows['frog-guess']:.4f} | {rows['local']:.4f} |" in text
