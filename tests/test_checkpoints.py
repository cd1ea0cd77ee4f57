"""Checkpoints hold tensors and plain values only; resume refuses anything else before it can run code."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from resume import assert_resume_is_identical, assert_same_run
from torch import nn

import frog.training.train
from frog.cli import main
from frog.errors import CheckpointError
from frog.training import checkpoints
from frog.training.results import read_csv, write_csv
from frog.training.train import TrainConfig, train

QUIET = {"progress": False, "log": lambda s: None}
BP = TrainConfig(model="fc", width=16, dataset="digits", gradient="bp", lr=0.1, epochs=1)
BP_ARGS = ["train", "--model", "fc", "--width", "16", "--dataset", "digits", "--gradient", "bp", "--lr", "0.1",
           "--epochs", "1"]


class RunsCode:
    """Unpickling this creates the folder ``marker``: an observable side effect of running code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    train(BP, tmp_path / "run", **QUIET)
    path = tmp_path / "run" / "checkpoint.pt"
    torch.save({"model": {}, "optimizer": {}, "estimator": None, "state": RunsCode(tmp_path / "ran")}, path)
    # the file is a real threat: an unsafe load runs its code
    shutil.copy(path, tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()
    os.rmdir(tmp_path / "ran")

    with pytest.raises(CheckpointError, match="without --resume") as caught:
        train(BP, tmp_path / "run", resume=True, **QUIET)
    assert str(path) in str(caught.value) and "convert" in str(caught.value)
    assert main([*BP_ARGS, "--resume", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and str(path) in err and "\n" not in err
    assert not (tmp_path / "ran").exists()


def test_a_trusted_checkpoint_with_numpy_values_converts_once(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"best": np.float64(0.5), "weights": np.arange(3.0), "nested": [{"step": np.int64(4)}]}, path)
    with pytest.raises(CheckpointError, match="convert"):
        checkpoints.load(path)
    checkpoints.convert(path)
    loaded = checkpoints.load(path)
    assert type(loaded["best"]) is float and loaded["best"] == 0.5
    assert torch.equal(loaded["weights"], torch.arange(3.0, dtype=torch.float64))
    assert loaded["nested"] == [{"step": 4}] and type(loaded["nested"][0]["step"]) is int


def test_damaged_checkpoints_and_foreign_values(tmp_path):
    train(BP, tmp_path, **QUIET)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="without --resume"):
        train(BP, tmp_path, resume=True, **QUIET)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="lacks optimizer, estimator, state"):
        train(BP, tmp_path, resume=True, **QUIET)
    # writing refuses what reading would refuse, naming the entry
    with pytest.raises(TypeError, match=r"checkpoint\['state'\]\['best'\] is a float64"):
        checkpoints.save(path, {"state": {"best": np.float64(1.0)}})
    with pytest.raises(TypeError, match=r"checkpoint\[0\] is a RunsCode"):
        checkpoints.check_plain([RunsCode(tmp_path)])


def test_resume_of_a_checkpoint_without_random_state_as_older_versions_wrote(tmp_path):
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="fg-mean", num_tangents=4, engine="sim",
                         lr=0.05, batch_size=32, epochs=2)

    def as_older_versions_wrote(folder: Path) -> None:
        path = folder / "checkpoint.pt"
        old = {key: value for key, value in checkpoints.load(path).items() if key != "rng"}
        assert old.keys() == {"model", "optimizer", "estimator", "state"}
        torch.save(old, path)

    assert_resume_is_identical(config, tmp_path, before_resume=as_older_versions_wrote)


def test_resume_restores_the_random_state_of_dropout(tmp_path, monkeypatch):
    """A network that draws random numbers while training (dropout) resumes with the same numbers."""
    plain = frog.training.train.make_model

    def with_dropout(*args, **kwargs) -> nn.Sequential:
        model = plain(*args, **kwargs)
        model.hidden2.append(nn.Dropout(0.5))
        return model

    monkeypatch.setattr(frog.training.train, "make_model", with_dropout)
    config = TrainConfig(model="fc", width=16, dataset="digits", gradient="bp", lr=0.1, batch_size=32, epochs=2)
    assert_resume_is_identical(config, tmp_path)  # the model, and the random state the dropout draws from


def test_the_resume_check_sees_any_difference(tmp_path):
    """tests/resume.py's comparison: two runs of the same settings agree; one changed bit of a checkpoint
    tensor, one changed plain value or one changed metric fails it, naming the entry; seconds do not."""
    for name in ("a", "b"):
        train(BP, tmp_path / name, **QUIET)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    path = tmp_path / "b" / "checkpoint.pt"
    saved = checkpoints.load(path)
    name = next(iter(saved["model"]))
    weight = saved["model"][name].view(-1)
    weight[0] = torch.nextafter(weight[0], torch.tensor(math.inf))  # one unit in the last place
    torch.save(saved, path)
    with pytest.raises(AssertionError, match=rf"model\['{name}'\]: values differ"):
        assert_same_run(tmp_path / "a", tmp_path / "b")
    assert_same_run(tmp_path / "a", tmp_path / "b", compare=("optimizer", "state", "rng"))
    saved["state"]["bad_epochs"] += 1
    torch.save(saved, path)
    with pytest.raises(AssertionError, match=r"state\['bad_epochs'\]: 0 vs 1"):
        assert_same_run(tmp_path / "a", tmp_path / "b", compare=("state",))
    header, rows = read_csv(tmp_path / "b" / "metrics.csv")
    write_csv(tmp_path / "b" / "metrics.csv", header, [{**rows[0], "seconds": "1e9"}])
    assert_same_run(tmp_path / "a", tmp_path / "b", compare=())
    write_csv(tmp_path / "b" / "metrics.csv", header, [{**rows[0], "val_loss": "0.5"}])
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "a", tmp_path / "b", compare=())
