"""The one check of every resumable training run: train N epochs straight; train ``first_epochs`` epochs,
stop, and resume to N; then the metric rows (all columns but ``seconds``) and the checkpoints (model,
optimizer, estimator state such as local heads, loop state, random state) are bit-identical.

Tests import it as ``from resume import assert_resume_is_identical`` (tests/ is on ``sys.path`` under
pytest, as for conftest's helpers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from frog.training import checkpoints
from frog.training.results import Row, read_csv
from frog.training.train import TrainConfig, train

CHECKPOINT = ("model", "optimizer", "estimator", "state", "rng")  # every entry a training checkpoint holds
QUIET = {"progress": False, "log": lambda s: None}

Run = Callable[..., Any]  # run(config, folder, *, resume=False, on_epoch=None): trains config into folder


def quiet_train(config: TrainConfig, folder: Path, **options: Any) -> Any:
    """``frog.training.train.train`` without progress bars or log lines."""
    return train(config, folder, **QUIET, **options)


class Interrupted(Exception):
    """Raised from ``on_epoch``: the run is killed after an epoch's row and checkpoint are written."""


def interrupt(config: TrainConfig, folder: Path, *, first_epochs: int = 1, stop: str = "config",
              run: Run = quiet_train, edit: bool = True) -> None:
    """Leave in ``folder`` a run of ``config`` (asked for ``config.epochs``) stopped after ``first_epochs``.

    ``stop="config"``: train a copy asked for ``first_epochs`` epochs, then write ``config.epochs`` into its
    config.json (``edit``; only one rank edits it in a distributed run), as if the longer run had been
    killed there. ``stop="on_epoch"``: train ``config`` itself and raise from ``on_epoch`` after epoch
    ``first_epochs``.
    """
    assert 1 <= first_epochs < config.epochs, "a resume needs epochs left to run"
    if stop == "config":
        run(dataclasses.replace(config, epochs=first_epochs), folder)
        if edit:
            saved = json.loads((folder / "config.json").read_text())
            saved["config"]["epochs"] = config.epochs
            (folder / "config.json").write_text(json.dumps(saved))
    elif stop == "on_epoch":
        def stop_after(row: dict[str, Any]) -> None:
            if int(row["epoch"]) >= first_epochs:
                raise Interrupted

        try:
            run(config, folder, on_epoch=stop_after)
        except Interrupted:
            pass
        else:
            raise AssertionError(f"the run in {folder} ended before epoch {first_epochs}: nothing to resume")
    else:
        raise ValueError(f"unknown stop {stop!r}: 'config' or 'on_epoch'")


def run_straight_and_resumed(config: TrainConfig, out: Path, *, first_epochs: int = 1, stop: str = "config",
                             run: Run = quiet_train, edit: bool = True,
                             before_resume: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """Train ``config`` straight into ``out/straight``, and interrupted after ``first_epochs`` then resumed
    into ``out/resumed`` (:func:`interrupt`; ``before_resume(folder)`` runs between the two parts).
    Returns the two folders."""
    straight, resumed = Path(out) / "straight", Path(out) / "resumed"
    run(config, straight)
    interrupt(config, resumed, first_epochs=first_epochs, stop=stop, run=run, edit=edit)
    if before_resume is not None:
        before_resume(resumed)
    run(config, resumed, resume=True)
    return straight, resumed


def without_seconds(rows: Sequence[Row]) -> list[Row]:
    """The metric rows without their wall time (the one column that may differ)."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """``a`` and ``b`` equal to the bit: tensors (dtype, shape, values; NaN where NaN), nested dicts, lists
    and plain values; the assertion names the first entry that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor and a {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else b}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_run(a: Path, b: Path, compare: Sequence[str] = CHECKPOINT) -> list[Row]:
    """The runs in folders ``a`` and ``b`` wrote the same metric rows (but for ``seconds``) and the same
    ``compare`` entries of their checkpoints. Returns a's rows."""
    rows_a, rows_b = read_csv(Path(a) / "metrics.csv")[1], read_csv(Path(b) / "metrics.csv")[1]
    assert rows_a, f"{a} has no metric rows"
    assert without_seconds(rows_b) == without_seconds(rows_a)
    saved_a, saved_b = checkpoints.load(Path(a) / "checkpoint.pt"), checkpoints.load(Path(b) / "checkpoint.pt")
    for key in compare:
        assert key in saved_a and key in saved_b, f"the checkpoints lack {key!r}"
        assert_identical(saved_a[key], saved_b[key], key)
    return rows_a


def assert_resume_is_identical(config: TrainConfig, out: Path, *, first_epochs: int = 1,
                               compare: Sequence[str] = CHECKPOINT, stop: str = "config", run: Run = quiet_train,
                               before_resume: Callable[[Path], None] | None = None) -> tuple[list[Row], list[Row]]:
    """Train ``config`` straight, and stopped after ``first_epochs`` then resumed (into ``out/straight`` and
    ``out/resumed``, :func:`run_straight_and_resumed`); assert that both wrote the same metric rows but
    for ``seconds``, more of them than the interrupted part, and checkpoints whose ``compare`` entries are
    bit-identical. Returns the rows (straight, resumed) as written to metrics.csv.

    ``stop``: how the first part ends (:func:`interrupt`); ``run(config, folder, *, resume=False,
    on_epoch=None)`` trains (default: :func:`quiet_train`; e.g. the command line instead);
    ``before_resume(folder)``: runs just before the resume (e.g. to rewrite the checkpoint as an older
    version did).
    """
    straight, resumed = run_straight_and_resumed(config, out, first_epochs=first_epochs, stop=stop, run=run,
                                                 before_resume=before_resume)
    rows = assert_same_run(straight, resumed, compare)
    assert len(rows) > first_epochs, "the straight run stopped before the resume point: nothing was resumed"
    return rows, read_csv(resumed / "metrics.csv")[1]
