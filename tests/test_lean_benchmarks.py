"""benchmarks/memory_frontier.py and benchmarks/studies/finetune.py, guess_alignment.py and weight_guesses.py: their
--quick runs finish and write what they promise (a fresh process per measurement, so these are the slowest tests:
about 1.5 min together)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/MPL-2.0")]


def run(script: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not all(p.exists() for p in TEXTS), reason="needs Debian's /usr/share/common-licenses texts")
def test_finetune_quick_writes_the_csv(tmp_path):
    summary = run("studies/finetune.py", tmp_path)
    with (tmp_path / "finetune.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["method", "k", "forward_passes", "heldout_loss", "peak_mb", "seconds"]
    assert {r["method"] for r in rows} == {"bp", "bp-checkpoint", "mezo", "frog-jvp", "frog-loop", "frog-activity"}
    assert {int(r["k"]) for r in rows if r["method"] == "frog-jvp"} == {1, 4, 16}
    starts = [r for r in rows if int(r["forward_passes"]) == 0]
    assert len({r["heldout_loss"] for r in starts}) == 1  # every method starts from the same pretrained weights
    assert all(int(r["forward_passes"]) <= 96 for r in rows)  # the quick budget
    for method in ("bp", "frog-jvp"):  # a step moves the loss: the runs train
        losses = [float(r["heldout_loss"]) for r in rows if r["method"] == method]
        assert math.isfinite(losses[-1]) and losses[-1] != losses[0]
    assert (tmp_path / "finetune.png").stat().st_size > 0
    assert summary["benchmark"] == "finetune" and "frog-jvp k=16" in summary["runs"]
    again = run("studies/finetune.py", tmp_path)  # a rerun finds every run in grid-quick.csv: the same table
    assert again["runs"] == summary["runs"]


def test_memory_frontier_quick_writes_the_csv_and_plot(tmp_path):
    summary = run("memory_frontier.py", tmp_path)
    with (tmp_path / "memory_frontier.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {r["sweep"] for r in rows} == {"centre", "depth"}
    centre = {(r["method"], int(r["k"])): r for r in rows if r["sweep"] == "centre"}
    methods = {"inference", "bp", "bp-checkpoint", "mezo", "frog-jvp", "frog-loop", "frog-activity", "local"}
    assert {m for m, _ in centre} == methods
    assert {int(r["depth"]) for r in rows if r["method"] == "local"} == {1, 2}  # local learning in the sweep too
    for row in rows:  # the total is the model plus the step
        assert float(row["total_mb"]) == pytest.approx(float(row["model_mb"]) + float(row["step_mb"]), abs=2e-3)
    assert (tmp_path / "memory_frontier.png").stat().st_size > 0
    assert summary["benchmark"] == "memory_frontier" and "lean_frog_total_x_bp" in summary
    assert "local_step_x_bp" in summary


def test_guess_alignment_quick_writes_a_cosine_per_head_and_block(tmp_path):
    """Each head kind gets one row per hidden block (5 on the ViT); a cosine lies in [-1, 1], its mean
    square in [0, 1] and at least the squared mean."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "studies" / "guess_alignment.py"), "--quick",
                    "--model", "vit", "--heads", "mean", "first:8", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with (tmp_path / "guess_alignment.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["heads"], int(r["block"])) for r in rows] == [(h, b) for h in ("mean", "first:8") for b in range(1, 6)]
    for r in rows:
        cosine, square = float(r["cosine"]), float(r["cosine_squared"])
        assert -1 <= cosine <= 1 and 0 <= square <= 1 and square >= cosine ** 2 - 1e-3


def test_weight_guesses_quick_projects_onto_the_guesses(tmp_path):
    """The output layer's guess tangent is that layer's exact gradient, so the estimate with guesses is
    much closer to the batch gradient than the one from random low-rank tangents alone."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "studies" / "weight_guesses.py"), "--quick",
                    "--lrs", "0.1", "--out", str(tmp_path)], check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with (tmp_path / "weight_guesses.csv").open() as file:
        rows = {r["estimator"]: r for r in csv.DictReader(file)}
    assert set(rows) == {"bp", "lowrank", "guesses"}
    assert float(rows["guesses"]["mean_cosine_to_gradient"]) > 2 * float(rows["lowrank"]["mean_cosine_to_gradient"])


def test_depth_study_quick_writes_the_tables_and_plot(tmp_path):
    """Every (setting, row, step size) run and each row's other seeds land in depth.csv, the best of each row
    in depth_best.csv, and the plot is drawn. With two hidden layers the first-order top-down guess is the
    exact gradient (g_top through the one block above), so that row trains as backprop does."""
    rows = ["bp", "local", "topdown1"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "studies" / "depth.py"), "--quick", "--rows", *rows,
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with (tmp_path / "depth.csv").open() as file:
        runs = list(csv.DictReader(file))
    assert len(runs) == 2 * len(rows) * 2  # two settings, one step size, two seeds
    with (tmp_path / "depth_best.csv").open() as file:
        best = {(r["setting"], r["row"]): r for r in csv.DictReader(file)}
    assert len(best) == 2 * len(rows) and (tmp_path / "depth.png").stat().st_size > 1000
    exact, bp = best[("plain-2", "topdown1")], best[("plain-2", "bp")]
    assert abs(float(exact["test_accuracy_mean"]) - float(bp["test_accuracy_mean"])) < 0.01


@pytest.mark.skipif(not TEXTS[0].exists(), reason="needs Debian's /usr/share/common-licenses/GPL-3")
def test_depth_gpt_quick_writes_the_csv(tmp_path):
    summary = run("studies/depth_gpt.py", tmp_path)
    with (tmp_path / "depth_gpt.csv").open() as file:
        runs = list(csv.DictReader(file))
    assert {r["row"] for r in runs} == {"bp", "local"} and len(runs) == 4
    assert all(math.isfinite(float(r["held_out_loss"])) for r in runs)
    assert [b["row"] for b in summary["best"]] == ["bp", "local"]
