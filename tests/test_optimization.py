"""Closed-form optimization (frog.experiments.optimization, frog optimize): the planned runs and their step
sizes, descent against its closed form, the summary's statistics, and the command's CSV, summary and resume."""

from __future__ import annotations

import math
import statistics

import pytest

from frog.cli import main
from frog.experiments.optimization import Run, descend, plan_runs, step_size, summarize
from frog.training.lrs import math_lr
from frog.training.results import read_csv as read
from frog.training.strategies import DEFAULT_LR

OPT_COLUMNS = ["function", "n", "method", "k", "seed", "lr", "best_value", "final_value", "steps"]


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


def test_plan_runs_bp_once_and_frog_from_k_2():
    runs = plan_runs(["sphere"], [4], [1, 2], ["bp", "fg-mean", "frog"], [0, 1], lr=0.1, lr_scale=2.0)
    assert [(r.method, r.k, r.seed) for r in runs] == [
        ("bp", None, 0), ("bp", None, 1), ("fg-mean", 1, 0), ("fg-mean", 1, 1), ("fg-mean", 2, 0), ("fg-mean", 2, 1),
        ("frog", 2, 0), ("frog", 2, 1)]
    assert {r.lr for r in runs} == {0.2} and {r.optimizer for r in runs} == {"sgd"}
    angled = plan_runs(["styblinski-tang"], [64], [16], ["bp", "frog"], [0], angles=[15.0, 30.0])
    assert [(r.method, r.angle) for r in angled] == [("bp", None), ("frog", 15.0), ("frog", 30.0)]
    assert angled[1].key() == ("styblinski-tang", "64", "frog", "16", "0", "angle", "15.0", "sgd")
    assert angled[0].key()[3] == "" and angled[0].key()[5] == "normal"


def test_step_sizes_come_from_the_paper_the_strategy_or_a_table(tmp_path):
    assert step_size("sphere", 16, "frog", 4) == math_lr("sphere", 16, "frog", 4)
    assert step_size("sphere", 16, "bp", 4) == math_lr("sphere", 16, "bp", None)
    assert step_size("styblinski-tang", 64, "frog", 16, 15.0) == math_lr("styblinski-tang", 64, "frog", 16, 15.0)
    for optimizer, lr in DEFAULT_LR.items():
        assert step_size("sphere", 16, "frog", 4, optimizer=optimizer) == lr
    table = tmp_path / "lrs.csv"
    table.write_text("function,n,gradient_approach,k,lr\nsphere,16,frog,4,0.375\n")
    assert step_size("sphere", 16, "frog", 4, lr_table=table) == 0.375
    (run,) = plan_runs(["sphere"], [16], [4], ["frog"], [0], lr_table=table, lr_scale=2.0)
    assert run.lr == 0.75


def test_plan_runs_bad_arguments():
    with pytest.raises(ValueError, match="mezo perturbs a model's weights in place: use it with frog train"):
        plan_runs(["sphere"], [4], [2], ["mezo"], [0], lr=0.1)
    with pytest.raises(ValueError, match="unknown function"):
        plan_runs(["ackley"], [4], [2], ["frog"], [0], lr=0.1)
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_runs(["sphere"], [0], [2], ["frog"], [0], lr=0.1)
    with pytest.raises(ValueError, match="give --lr or --lr-table, not both"):
        plan_runs(["sphere"], [4], [2], ["frog"], [0], lr=0.1, lr_table="lrs.csv")
    with pytest.raises(ValueError, match="--lr-scale must be > 0, got 0"):
        plan_runs(["sphere"], [4], [2], ["frog"], [0], lr=0.1, lr_scale=0)


def test_descend_with_bp_on_sphere_is_the_closed_form():
    """Sphere from (-1, ..., -1): x_t = (1 - 2 lr)^t x_0, so f(x_t) = n (1 - 2 lr)^(2 t)."""
    result = descend(Run("sphere", 4, "bp", None, 0, 0.1), steps=3)
    assert result.final_value == pytest.approx(4 * 0.8 ** 6, rel=1e-6)
    assert result.best_value == result.final_value and result.steps == 3 and not result.diverged
    frog_run = descend(Run("sphere", 4, "frog", 4, 0, 0.1), steps=3)  # k = n: the exact gradient
    assert frog_run.final_value == pytest.approx(4 * 0.8 ** 6, rel=1e-5)


def test_summarize_is_the_mean_and_sample_std_over_seeds():
    rows = [{"function": "styblinski-tang", "n": 2, "method": "frog", "k": 2, "angle": None, "optimizer": "sgd",
             "seed": seed, "best_value": best, "diverged": diverged, "extra_forward_passes_per_step": passes}
            for seed, best, diverged, passes in ((0, -70.0, False, 2.0), (1, -60.0, "true", 4.0), (2, -65.0, False, ""))]
    rows.append({**rows[0], "method": "fg-mean", "seed": 0})
    frog_row, mean_row = summarize(rows)
    assert (frog_row["method"], frog_row["runs"], frog_row["diverged"]) == ("frog", 3, 1)
    assert frog_row["best_mean"] == pytest.approx(statistics.mean([-70.0, -60.0, -65.0]))
    assert frog_row["best_std"] == pytest.approx(statistics.stdev([-70.0, -60.0, -65.0]))
    assert frog_row["minimum"] == pytest.approx(2 * -39.16616570377141)
    assert frog_row["extra_forward_passes_per_step"] == pytest.approx(2.0)  # (2 + 4 + 0) / 3
    assert (mean_row["runs"], mean_row["best_std"]) == (1, 0.0)
