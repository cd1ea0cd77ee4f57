"""Network trainings (frog.experiments.networks): the folder of each combination, and the summary row of
each run read back against its metrics.csv (test accuracy at the epoch of best validation accuracy)."""

from __future__ import annotations

import json

import pytest

from frog.experiments.networks import NetworkRuns, run_networks
from frog.training.lrs import network_lr, variant_lr
from frog.training.results import read_csv


def test_folders_name_every_setting():
    fc = NetworkRuns(["mnist"], [256], [("frog", 4)], [0], epochs=1)
    assert fc.folder("mnist", 256, "frog", 4, 0) == "mnist_w256_frog_k4_s0"
    assert fc.folder("mnist", 256, "bp", None, 2) == "mnist_w256_bp_s2"
    quick = NetworkRuns(["cifar10"], [None], [("bp", None)], [0], epochs=1, model="resnet18", images=64)
    assert quick.folder("cifar10", None, "fg-mean", 1, 1) == "cifar10_resnet18_fg-mean_k1_s1_n64"


def test_each_run_trains_with_the_papers_step_size_and_is_summarized_from_its_metrics(tmp_path):
    runs = NetworkRuns(["digits"], [256], [("bp", None), ("frog", 2)], [3], epochs=2, images=48)
    logged = []
    summary = run_networks(runs, tmp_path, log=logged.append)
    assert logged == ["training digits_w256_bp_s3_n48", "training digits_w256_frog_k2_s3_n48"]
    for row, (method, k) in zip(summary, runs.approaches, strict=True):
        folder = tmp_path / runs.folder("digits", 256, method, k, 3)
        config = json.loads((folder / "config.json").read_text())["config"]
        assert (config["gradient"], config["num_tangents"], config["seed"], config["engine"]) == (method, k or 1, 3, "sim")
        assert config["lr"] == network_lr("fc", 256, "digits", method, k)[0]
        metrics = read_csv(folder / "metrics.csv")[1]
        assert len(metrics) == 2
        best = max(metrics, key=lambda r: float(r["val_accuracy"]))  # the first of equals
        assert row == {
            "dataset": "digits", "model": "fc", "width": 256, "method": method, "k": k, "seed": 3, "epochs": 2,
            "best_epoch": int(best["epoch"]), "best_val_accuracy": float(best["val_accuracy"]),
            "test_accuracy": float(best["test_accuracy"]),
            "seconds_per_epoch": pytest.approx(sum(float(r["seconds"]) for r in metrics) / 2),
        }
    # on 48 images: every split cut to 48
    assert all(float(r["test_accuracy"]) * 48 == pytest.approx(round(float(r["test_accuracy"]) * 48))
               for r in read_csv(tmp_path / "digits_w256_bp_s3_n48" / "metrics.csv")[1])
    again = run_networks(runs, tmp_path, log=logged.append)  # resumes: the finished runs train no more
    assert again == summary


def test_frog_guess_trains_frog_with_local_heads(tmp_path):
    runs = NetworkRuns(["digits"], [256], [("frog-guess", 4)], [0], epochs=1, images=32)
    (row,) = run_networks(runs, tmp_path, log=lambda s: None)
    assert (row["method"], row["k"]) == ("frog-guess", 4)
    config = json.loads((tmp_path / "digits_w256_frog-guess_k4_s0_n32" / "config.json").read_text())["config"]
    assert (config["gradient"], config["guess"], config["num_tangents"]) == ("frog", "local", 4)
    assert config["lr"] == variant_lr("fc", 256, "digits", "frog", 4, "guess")[0]
