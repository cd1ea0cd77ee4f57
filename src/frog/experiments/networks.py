"""Fully-connected networks trained with bp, fg-mean and frog (SPEC 2.4, paper Sec. 4.4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import load_dataset
from ..train import TrainConfig, train

SUMMARY_COLUMNS = ["dataset", "width", "method", "k", "seed", "epochs", "best_epoch", "best_val_accuracy",
                   "test_accuracy", "seconds_per_epoch"]
PAPER_APPROACHES = [("bp", None), ("fg-mean", 1), ("fg-mean", 2), ("fg-mean", 4), ("fg-mean", 16),
                    ("frog", 2), ("frog", 4), ("frog", 16)]


@dataclass(frozen=True)
class NetworkRuns:
    """Which trainings to run: every (dataset, width, approach, seed) combination."""

    datasets: Sequence[str]
    widths: Sequence[int]
    approaches: Sequence[tuple[str, int | None]]
    seeds: Sequence[int]
    epochs: int
    engine: str = "sim"
    data_dir: str | None = None


def run_networks(runs: NetworkRuns, out: Path, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Train each combination into ``out/<dataset>_w<width>_<method>[_k<k>]_s<seed>`` (resumable) and
    return one summary row each: test accuracy at the epoch of best validation accuracy."""
    summary = []
    for dataset in runs.datasets:
        data = load_dataset(dataset, runs.data_dir)
        for width in runs.widths:
            for method, k in runs.approaches:
                for seed in runs.seeds:
                    name = f"{dataset}_w{width}_{method}" + (f"_k{k}" if k else "") + f"_s{seed}"
                    log(f"training {name}")
                    config = TrainConfig(model="fc", width=width, dataset=dataset, data_dir=runs.data_dir,
                                         gradient=method, tangents=k or 1, engine=runs.engine,
                                         epochs=runs.epochs, seed=seed)
                    rows = train(config, out / name, resume=True, progress=False, log=lambda s: None, data=data)
                    best = max(rows, key=lambda r: float(r["val_accuracy"]))
                    summary.append({
                        "dataset": dataset, "width": width, "method": method, "k": k, "seed": seed,
                        "epochs": len(rows), "best_epoch": int(best["epoch"]),
                        "best_val_accuracy": float(best["val_accuracy"]),
                        "test_accuracy": float(best["test_accuracy"]),
                        "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows),
                    })
    return summary
