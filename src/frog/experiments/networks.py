"""Networks trained with bp, fg-mean and frog: fully-connected (paper Sec. 4.4) and the ResNet18 / ViT of
Table I (Sec. 4.5).

Results: docs/reproducing.md, "Fully-connected networks on Fashion-MNIST" and "Table I slice".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.data import load_dataset, subset
from ..training.results import Row
from ..training.train import TrainConfig, train

SUMMARY_COLUMNS = ["dataset", "model", "width", "method", "k", "seed", "epochs", "best_epoch", "best_val_accuracy",
                   "test_accuracy", "seconds_per_epoch"]
PAPER_APPROACHES = [("bp", None), ("fg-mean", 1), ("fg-mean", 2), ("fg-mean", 4), ("fg-mean", 16),
                    ("frog", 2), ("frog", 4), ("frog", 16)]
PAPER_METHODS = ("bp", "fg-mean", "fg-sum", "frog")
# beyond the paper: frog with guesses from local heads, and local learning with the same heads (its baseline)
BEYOND_APPROACHES = [("frog-guess", 16), ("local", None)]
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"frog-guess": {"gradient": "frog", "guess": "local"}}  # name -> settings


@dataclass(frozen=True)
class NetworkRuns:
    """Which trainings to run: every (dataset, width, approach, seed) combination of ``model``.

    ``widths`` are the hidden widths of ``fc`` (other models have one size: give ``[None]``).
    ``images``: train and evaluate on the first this many images of each split (a quick check that
    the runs work; None: all). The step size is the paper's (:func:`frog.training.lrs.network_lr`), the
    perturbation ``frog train``'s default (activity, as the paper)."""

    datasets: Sequence[str]
    widths: Sequence[int | None]
    approaches: Sequence[tuple[str, int | None]]
    seeds: Sequence[int]
    epochs: int
    engine: str = "sim"
    data_dir: str | None = None
    model: str = "fc"
    images: int | None = None

    def folder(self, dataset: str, width: int | None, method: str, k: int | None, seed: int) -> str:
        """``<dataset>_<w<width> or model>_<method>[_k<k>]_s<seed>[_n<images>]``."""
        size = f"w{width}" if self.model == "fc" else self.model
        return (f"{dataset}_{size}_{method}" + (f"_k{k}" if k else "") + f"_s{seed}"
                + (f"_n{self.images}" if self.images else ""))


def run_networks(runs: NetworkRuns, out: Path, log: Callable[[str], None] = print) -> list[Row]:
    """Train each combination into ``out/<runs.folder(...)>`` (resumable) and return one summary row
    each: test accuracy at the epoch of best validation accuracy."""
    summary = []
    for dataset in runs.datasets:
        data = load_dataset(dataset, runs.data_dir)
        if runs.images:
            data = subset(data, runs.images)
        for width in runs.widths:
            for method, k in runs.approaches:
                for seed in runs.seeds:
                    name = runs.folder(dataset, width, method, k, seed)
                    log(f"training {name}")
                    options = METHOD_OPTIONS.get(method, {"gradient": method})
                    config = TrainConfig(model=runs.model, dataset=dataset, data_dir=runs.data_dir,
                                         num_tangents=k or 1, engine=runs.engine, epochs=runs.epochs, seed=seed,
                                         width=width or TrainConfig.width, **options)
                    rows = train(config, out / name, resume=True, progress=False, log=lambda s: None, data=data)
                    best = max(rows, key=lambda r: float(r["val_accuracy"]))
                    summary.append({
                        "dataset": dataset, "model": runs.model, "width": width, "method": method, "k": k,
                        "seed": seed, "epochs": len(rows), "best_epoch": int(best["epoch"]),
                        "best_val_accuracy": float(best["val_accuracy"]),
                        "test_accuracy": float(best["test_accuracy"]),
                        "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows),
                    })
    return summary
