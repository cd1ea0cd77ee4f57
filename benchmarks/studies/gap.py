"""The gap to backprop on Fashion-MNIST (README "Closing the gap"): every row is one `frog train` run.

Runs the rows of --networks one after another (each a `frog train` command, printed with its
result), skipping rows whose run already finished, so an interrupted table resumes where it stopped
(`frog train --resume` continues a row that was cut off mid-run). Writes OUT/gap.csv (network, row,
epochs, test accuracy, seconds per epoch, ratio to backprop's seconds per epoch, lr and where it came
from, command) and prints it as a Markdown table.

    python benchmarks/studies/gap.py [--networks fc256 fc1024 resnet18 vit] [--rows NAME ...] [--out runs/gap]
                                     [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

NETWORKS = {  # name -> (model options, epochs)
    "fc256": (["--model", "fc", "--width", "256"], 5),
    "fc1024": (["--model", "fc", "--width", "1024"], 5),
    "resnet18": (["--model", "resnet18"], 3),
    "vit": (["--model", "vit"], 3),
}
FROG = ["--gradient", "frog", "-k", "16"]
ROWS = [  # (row, options, networks it runs on: None = all)
    ("backprop", ["--gradient", "bp"], None),
    ("frog (paper: shared tangents)", FROG + ["--engine", "sim"], None),
    ("frog, per-example tangents", FROG + ["--engine", "sim", "--per-example-tangents"], None),
    ("frog, guesses", FROG + ["--engine", "sim", "--guess", "local"], None),
    ("frog, guesses + per-example", FROG + ["--engine", "sim", "--guess", "local", "--per-example-tangents"], None),
    ("frog, guesses, jvp (true forward mode)", FROG + ["--engine", "jvp", "--guess", "local"], {"fc1024"}),
    ("frog, guesses, k = 4", ["--gradient", "frog", "-k", "4", "--engine", "sim", "--guess", "local"], {"fc1024"}),
    ("fg-mean, guesses", ["--gradient", "fg-mean", "-k", "16", "--engine", "sim", "--guess", "local"], {"fc1024"}),
    ("frog, guesses, lr 0.05", FROG + ["--engine", "sim", "--guess", "local", "--lr", "0.05"], {"resnet18"}),
    ("frog, guesses, conv heads, lr 0.05", FROG + ["--engine", "sim", "--guess", "local", "--head-channels", "32",
                                                   "--lr", "0.05"], {"resnet18"}),
    ("frog, guesses, conv heads, lr 0.02", FROG + ["--engine", "sim", "--guess", "local", "--head-channels", "32",
                                                   "--lr", "0.02"], {"resnet18"}),
    ("backprop, cosine lr", ["--gradient", "bp", "--lr-schedule", "cosine"], {"resnet18", "vit"}),
    ("frog, guesses, conv heads, lr 0.05, cosine", FROG + ["--engine", "sim", "--guess", "local", "--head-channels",
                                                           "32", "--lr", "0.05", "--lr-schedule", "cosine"],
     {"resnet18"}),
    ("frog, guesses, class-token heads, lr 0.1, cosine", FROG + ["--engine", "sim", "--guess", "local", "--head-tokens",
                                                                 "first", "--lr", "0.1", "--lr-schedule", "cosine"],
     {"vit"}),
]
COLUMNS = ["network", "row", "epochs", "test_accuracy", "seconds_per_epoch", "over_backprop", "lr", "lr_source",
           "command"]


def finished(out: Path, epochs: int) -> list[dict[str, str]] | None:
    """The metric rows of a run in ``out`` that reached ``epochs`` epochs or stopped (diverged, or a
    non-finite validation loss), else None."""
    metrics = out / "metrics.csv"
    if not metrics.exists():
        return None
    rows = list(csv.DictReader(metrics.open()))
    last = rows[-1] if rows else None
    done = last and (int(last["epoch"]) >= epochs or last["diverged"] == "True"
                     or not math.isfinite(float(last["val_loss"])))  # the run stopped there
    return rows if done else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (by name; backprop too, for the ratio)")
    parser.add_argument("--out", default="runs/gap")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frog = str(Path(sys.executable).with_name("frog"))
    table = []
    for network in args.networks:
        model, epochs = NETWORKS[network]
        backprop_seconds = None
        for row, options, only in ROWS:
            if (only and network not in only) or (args.rows and row not in args.rows):
                continue
            run_dir = out / network / row.replace(" ", "_").replace(",", "").replace(":", "").replace("(", "") \
                .replace(")", "").replace("=", "")
            command = ["frog", "train", *model, "--dataset", "fashion-mnist", *options, "--epochs", str(epochs),
                       "--seed", "0", "--out", str(run_dir)]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
            rows = finished(run_dir, epochs)
            if rows is None:
                print("$ " + shlex.join(command), flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                ran = subprocess.run([frog, *command[1:], "--resume"], env=env, check=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
                if ran.returncode != 0:
                    print(ran.stderr.strip().splitlines()[-1] if ran.stderr.strip() else f"exit {ran.returncode}")
                rows = finished(run_dir, epochs)
            if rows is None:
                print(f"  {network} / {row}: did not finish", flush=True)
                continue
            config = json.loads((run_dir / "config.json").read_text())
            seconds = sum(float(r["seconds"]) for r in rows) / len(rows)
            backprop_seconds = seconds if row == "backprop" else backprop_seconds
            result = {"network": network, "row": row, "epochs": rows[-1]["epoch"],
                      "test_accuracy": f"{float(rows[-1]['test_accuracy']):.4f}",
                      "seconds_per_epoch": f"{seconds:.1f}",
                      "over_backprop": f"{seconds / backprop_seconds:.1f}" if backprop_seconds else "",
                      "lr": f"{float(config['config']['lr']):.4g}", "lr_source": config["lr_source"],
                      "command": shlex.join(command[:-2])}
            table.append(result)
            print(f"  {network} / {row}: test accuracy {result['test_accuracy']}, {result['seconds_per_epoch']} s/epoch",
                  flush=True)
            with (out / "gap.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, COLUMNS)
                writer.writeheader()
                writer.writerows(table)
    print("\n| network | row | test accuracy | s / epoch (x bp) | lr |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['network']} | {r['row']} | {r['test_accuracy']} | {r['seconds_per_epoch']} ({r['over_backprop']}) "
              f"| {r['lr']} |")


if __name__ == "__main__":
    main()
