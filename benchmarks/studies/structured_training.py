"""Train FC networks on Fashion-MNIST with structured weight tangents, beside dense ones, activity
perturbation (the paper's) and backprop: one small step-size sweep for every method, then a run.

Methods (frog, k = 16, seed 0, batch 64, plain SGD): ``bp``; ``activity`` (the paper's activity
perturbation); weight perturbation with ``normal`` (dense), ``lowrank`` (rank 1) and ``input-span``
(rank 1) tangents. Widths 256 and 1024 (784-W-W-10).

1. Sweep: every method trains 1 epoch at each step size of --grid (the same grid for all; the sim
   engine, whose numbers equal jvp's); the step size with the lowest validation loss wins (a
   diverged run loses).
2. Run: --epochs epochs at the chosen step size with --engine (default jvp: true forward mode, whose
   seconds per epoch are the cost this table reports: the median over the epochs). A run that
   diverges is kept and the sweep's next best step size runs instead (column diverged_lrs).

Results: OUT/sweep.csv, OUT/table.csv, and each training's folder (metrics.csv, checkpoint.pt).
Everything resumes: a rerun skips what is written and continues interrupted trainings.

    python benchmarks/studies/structured_training.py [--widths 256 1024] [--methods ...] [--epochs 5]
        [--grid 0.01 0.03 ... 100 300] [--engine jvp] [--sweep-only] [--out runs/structured]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from frog.training.data import load_dataset
from frog.training.results import CsvLog
from frog.training.train import TrainConfig, train

METHODS = {  # name: TrainConfig settings
    "bp": {"gradient": "bp"},
    "activity": {"gradient": "frog", "perturbation": "activity"},
    "normal": {"gradient": "frog", "perturbation": "weight", "sampler": "normal"},
    "lowrank": {"gradient": "frog", "perturbation": "weight", "sampler": "lowrank"},
    "input-span": {"gradient": "frog", "perturbation": "weight", "sampler": "input-span"},
}
SWEEP = ["width", "method", "lr", "val_loss", "val_accuracy", "diverged", "seconds"]
TABLE = ["width", "method", "lr", "epochs", "test_accuracy", "val_accuracy", "seconds_per_epoch", "engine", "command",
         "diverged_lrs"]


def command(width: int, method: str, lr: float, epochs: int, engine: str) -> str:
    """The frog train command line of one run."""
    settings = METHODS[method]
    parts = [f"frog train --model fc --width {width} --dataset fashion-mnist --gradient {settings['gradient']}"]
    if settings["gradient"] != "bp":
        parts.append(f"-k 16 --engine {engine} --perturbation {settings['perturbation']}")
        if "sampler" in settings:
            parts.append(f"--sampler {settings['sampler']}")
    parts.append(f"--lr {lr:g} --epochs {epochs} --seed 0")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--engine", default="jvp")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweeps")
    parser.add_argument("--out", default="runs/structured")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep, table = CsvLog(out / "sweep.csv", SWEEP), CsvLog(out / "table.csv", TABLE)
    data = load_dataset("fashion-mnist", args.data_dir, split_seed=0)
    quiet = {"progress": False, "log": lambda s: None, "data": data}
    for width in args.widths:
        for method in args.methods:
            base = {"model": "fc", "width": width, "dataset": "fashion-mnist", "num_tangents": 16, "seed": 0, **METHODS[method]}
            losses = {}
            for lr in args.grid:
                done = {float(r["lr"]): r for r in sweep.rows if (r["width"], r["method"]) == (str(width), method)}
                if lr not in done:
                    rows = train(TrainConfig(**base, lr=lr, epochs=1, engine="sim"),
                                 out / "sweep" / f"w{width}_{method}_lr{lr:g}", resume=True, **quiet)
                    last = rows[-1]
                    diverged = last["diverged"] == "true" or not math.isfinite(float(last["val_loss"]))
                    sweep.append({"width": width, "method": method, "lr": lr, "val_loss": float(last["val_loss"]),
                                  "val_accuracy": float(last["val_accuracy"]), "diverged": diverged,
                                  "seconds": float(last["seconds"])})
                    done[lr] = sweep.rows[-1]
                row = done[lr]
                losses[lr] = math.inf if row["diverged"] == "true" else float(row["val_loss"])
                print(f"sweep w{width} {method:<10} lr {lr:<6g} val loss {losses[lr]:.4f}", flush=True)
            if args.sweep_only or any((r["width"], r["method"]) == (str(width), method) for r in table.rows):
                continue
            ranked = sorted((lr for lr in losses if math.isfinite(losses[lr])), key=losses.get)
            diverged = []  # step sizes whose run diverged: the next best of the sweep runs instead
            for rank, lr in enumerate(ranked):
                folder = out / (f"w{width}_{method}" if rank == 0 else f"w{width}_{method}_lr{lr:g}")
                rows = train(TrainConfig(**base, lr=lr, epochs=args.epochs, engine=args.engine, patience=args.epochs),
                             folder, resume=True, **quiet)
                if rows[-1]["diverged"] != "true":
                    break
                diverged.append(lr)
            table.append({"width": width, "method": method, "lr": lr, "epochs": len(rows),
                          "test_accuracy": float(rows[-1]["test_accuracy"]),
                          "val_accuracy": float(rows[-1]["val_accuracy"]),
                          "seconds_per_epoch": statistics.median(float(r["seconds"]) for r in rows),
                          "engine": args.engine if method != "bp" else "",
                          "command": command(width, method, lr, args.epochs, args.engine),
                          "diverged_lrs": " ".join(f"{d:g}" for d in diverged)})
            print(f"w{width} {method:<10} lr {lr:g}: test accuracy {float(rows[-1]['test_accuracy']):.4f}, "
                  f"{table.rows[-1]['seconds_per_epoch']} s/epoch", flush=True)


if __name__ == "__main__":
    main()
