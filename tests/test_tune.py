"""frog tune end to end on tiny settings: outputs, resume, kill and resume, workers, --lr-table, errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from frog.cli import main
from frog.experiments.tune import open_storage
from frog.training.lrs import math_lr

TINY = ["tune", "optimize", "--function", "sphere", "--dims", "8", "-k", "2", "--methods", "fg-mean", "frog",
        "--steps", "40"]


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_tune_writes_lrs_trials_and_plot(tmp_path):
    assert main([*TINY, "--trials", "4", "--out", str(tmp_path)]) == 0
    trials = read(tmp_path / "trials.csv")
    assert sorted({r["gradient_approach"] for r in trials}) == ["fg-mean", "frog"]
    for method in ("fg-mean", "frog"):
        mine = [r for r in trials if r["gradient_approach"] == method]
        assert len(mine) == 4 and {r["state"] for r in mine} <= {"complete", "pruned", "diverged"}
        guess = math_lr("sphere", 8, method, 2)  # the default range: 4 decades around the paper's step size
        assert all(guess / 100 <= float(r["lr"]) <= guess * 100 for r in mine)
    lrs = read(tmp_path / "lrs.csv")
    assert list(lrs[0])[:5] == ["function", "n", "gradient_approach", "k", "lr"]
    for row in lrs:  # the best complete trial; among trials that tie for the best value, the median lr
        complete = [r for r in trials if r["gradient_approach"] == row["gradient_approach"] and r["state"] == "complete"]
        best = min(float(r["value"]) for r in complete)
        ties = sorted(float(r["lr"]) for r in complete if float(r["value"]) - best <= 1e-9 * max(1, abs(best)))
        assert float(row["lr"]) == ties[(len(ties) - 1) // 2] and int(row["ties"]) == len(ties)
        assert float(row["objective"]) - best <= 1e-9 * max(1, abs(best)) and row["trials"] == "4"
    assert (tmp_path / "tune.png").stat().st_size > 1000


def test_rerun_adds_no_trials_and_more_trials_continue(tmp_path):
    args = [*TINY, "--methods", "fg-mean", "--out", str(tmp_path)]
    assert main([*args, "--trials", "4"]) == 0
    first = read(tmp_path / "trials.csv")
    assert main([*args, "--trials", "4"]) == 0
    assert read(tmp_path / "trials.csv") == first
    assert main([*args, "--trials", "6"]) == 0
    more = read(tmp_path / "trials.csv")
    assert len(more) == 6 and more[:4] == first


def test_calls_into_one_folder_build_one_table(tmp_path):
    for method in ("fg-mean", "frog"):
        assert main([*TINY, "--methods", method, "--trials", "3", "--out", str(tmp_path)]) == 0
    assert sorted(r["gradient_approach"] for r in read(tmp_path / "lrs.csv")) == ["fg-mean", "frog"]
    assert len(read(tmp_path / "trials.csv")) == 6


def test_same_seed_same_trials(tmp_path):
    for name in ("a", "b"):
        assert main([*TINY, "--methods", "frog", "--trials", "4", "--seed", "3", "--out", str(tmp_path / name)]) == 0
    keep = ("number", "lr", "value", "state")
    a, b = ([{c: r[c] for c in keep} for r in read(tmp_path / name / "trials.csv")] for name in ("a", "b"))
    assert a == b


def _counted(url: str) -> int:
    storage = open_storage(url)  # waits for SQLite's lock instead of failing while the tune writes
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return 0
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))


def test_killed_tune_resumes(tmp_path):
    args = [*TINY, "--methods", "fg-mean", "--steps", "1200", "--trials", "5", "--out", str(tmp_path)]
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "frog", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (tmp_path / "trials.csv").exists() and _counted(storage) >= 2:  # written after a trial: the schema is there
                break
            time.sleep(0.2)
        time.sleep(0.3)  # most likely inside the next trial
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = {r["number"]: r for r in read(tmp_path / "trials.csv") if r["state"] != "running"} if (
        tmp_path / "trials.csv").exists() else {}
    assert 2 <= _counted(storage) < 5, "the kill came too late to test a resume"
    assert main(args) == 0
    after = read(tmp_path / "trials.csv")
    assert sum(r["state"] in ("complete", "pruned", "diverged") for r in after) == 5
    assert all(after_row == before[after_row["number"]] for after_row in after if after_row["number"] in before)
    for killed in (r for r in after if r["state"] == "failed"):  # its lr runs again, once
        assert [r["lr"] for r in after if r["retry_of"] == killed["number"]] == [killed["lr"]]
    finished = [r["lr"] for r in after if r["state"] != "failed"]
    assert len(finished) == len(set(finished)), "no finished trial is repeated"


def test_workers_share_the_studies(tmp_path):
    args = [*TINY, "--methods", "fg-mean", "--steps", "300", "--trials", "6", "--workers", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    trials = read(tmp_path / "trials.csv")
    assert 6 <= len(trials) <= 7  # a worker may start one trial while the other finishes the 6th
    assert {r["worker"] for r in trials} == {"0", "1"}
    assert len({r["number"] for r in trials}) == len(trials)


def test_lr_table_from_a_tune_is_used_by_optimize(tmp_path):
    assert main([*TINY, "--trials", "4", "--out", str(tmp_path / "tune")]) == 0
    table = {r["gradient_approach"]: r for r in read(tmp_path / "tune" / "lrs.csv")}
    assert main(["optimize", "--function", "sphere", "--dims", "8", "-k", "2", "--methods", "fg-mean", "frog",
                 "--seeds", "0", "--steps", "40", "--lr-table", str(tmp_path / "tune" / "lrs.csv"),
                 "--out", str(tmp_path / "opt")]) == 0
    for row in read(tmp_path / "opt" / "optimization.csv"):
        tuned = table[row["method"]]
        assert float(row["lr"]) == float(tuned["lr"])
        # the same run as the tune's best trial (seed 0): the same best value
        assert float(row["best_value"]) == pytest.approx(float(tuned["objective"]), rel=1e-6, abs=1e-30)


def test_tune_train_and_lr_table_in_train(tmp_path):
    common = ["--model", "fc", "--width", "16", "--dataset", "digits", "--epochs", "2", "--engine", "sim"]
    assert main(["tune", "train", *common, "--gradient", "frog", "-k", "4", "--trials", "3",
                 "--out", str(tmp_path / "tune")]) == 0
    (row,) = read(tmp_path / "tune" / "lrs.csv")
    assert (row["model"], row["dataset"], row["gradient_approach"], row["k"]) == ("fc_w=16", "digits", "frog", "4")
    trials = read(tmp_path / "tune" / "trials.csv")
    assert len(trials) == 3 and not list(tmp_path.glob("tune/runs/*/*/checkpoint.pt"))  # weights not kept
    assert main(["train", *common, "--gradient", "frog", "-k", "4", "--lr-table", str(tmp_path / "tune" / "lrs.csv"),
                 "--out", str(tmp_path / "train")]) == 0
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["config"]["lr"] == float(row["lr"])
    best = min(float(r["val_loss"]) for r in read(tmp_path / "train" / "metrics.csv"))
    assert best == pytest.approx(float(row["objective"]), rel=1e-6)  # the best trial's run, again


@pytest.mark.parametrize(("extra", "message"), [
    (["--trials", "0"], "--trials must be >= 1"),
    (["--trials", "2", "--lr-range", "0.1", "0.01"], "non-empty range"),
    (["--trials", "2", "--lr-range", "0.1", "0.1"], "non-empty range"),
    (["--trials", "2", "--lr-range", "0", "1"], "0 < LO < HI"),
    (["--trials", "2", "--storage", "sqlite:////nonexistent-folder/x/tune.db"], "cannot open the storage"),
    (["--trials", "2", "--storage", "postgresql://frog@127.0.0.1:1/frog"], "cannot open the storage"),
    (["--trials", "2", "--workers", "0"], "--workers must be >= 1"),
])
def test_bad_tune_options_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main([*TINY, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and message in err and "\n" not in err


def test_changed_settings_in_the_same_folder_are_an_error(tmp_path, capsys):
    assert main([*TINY, "--methods", "frog", "--trials", "2", "--out", str(tmp_path)]) == 0
    assert main([*TINY, "--methods", "frog", "--trials", "2", "--steps", "30", "--out", str(tmp_path)]) == 2
    assert "tuned with other settings" in capsys.readouterr().err


def test_lr_table_without_the_setting_is_an_error(tmp_path, capsys):
    table = tmp_path / "lrs.csv"
    table.write_text("function,n,gradient_approach,k,lr\nsphere,8,frog,2,0.1\n")
    out = str(tmp_path / "o")
    assert main(["optimize", "--function", "sphere", "--dims", "8", "-k", "4", "--methods", "frog", "--seeds", "0",
                 "--steps", "5", "--lr-table", str(table), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and "n=8, gradient_approach=frog, k=4" in err and "\n" not in err
    assert main(["train", "--dataset", "digits", "--lr-table", str(table), "--out", out]) == 2
    assert "lacks the column(s) model, dataset" in capsys.readouterr().err
    assert main(["optimize", "--function", "sphere", "--dims", "8", "-k", "2", "--methods", "frog", "--seeds", "0",
                 "--steps", "5", "--lr-table", str(table), "--lr", "0.1", "--out", out]) == 2
    assert "not both" in capsys.readouterr().err
