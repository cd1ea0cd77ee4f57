"""Depth study: backprop, local learning and frog with guesses as networks get deeper (Fashion-MNIST).

Settings (--settings): ``plain-D``, an MLP of width 256 with D hidden Linear+ReLU layers (``--model fc
--depth D``); ``res-D``, a pre-norm residual MLP of width 256 with D residual blocks (``--model resmlp
--depth D``), each hidden layer a block and the classifier the last block; ``resnet18``, ResNet18 with every
BasicBlock a block of its own (``--split-stacks``, 10 blocks); ``vit``, the Table I ViT (6 blocks, class-token
heads). The two image networks train on the first --train-size training images (the same cut for every row).
The gap table's networks for the same protocol: ``fc256``, ``fc1024`` and ``resnet18-stages`` (the paper's
blocks, conv heads of 32 channels).

Rows (--rows): ``bp`` (backprop); ``local`` (local learning with the same heads, ``--gradient local``);
``frog`` (frog with local-head guesses, k = 16, or L + 4 where L + 4 > 16); ``frog-kL`` (k = L, guesses
only); ``frog-topdown`` / ``frog-topdown-kL`` (top-down guesses, ``--guess topdown``); ``topdown`` (top-down
guesses used directly, c = 1: ``--gradient local --guess topdown``); and the variants of VARIANTS.

Protocol: every row gets the same step-size grid (--lrs) with seed 0 and a cosine decay over --epochs;
the step size with the best final validation accuracy is then run with every other seed (--seeds).
Every run is one ``frog.training.train.train`` call in OUT/runs/<setting>/<row>/lr<lr>-s<seed> (resumable:
a finished run is read back, a cut one continues). Writes OUT/depth.csv (every run) and
OUT/depth_best.csv (per setting and row: the chosen lr and the test accuracy of each seed), prints the
best table as Markdown, and plots test accuracy against depth (OUT/depth.png).

With --timing it instead measures the time of one training step in true forward mode (``--engine jvp``)
for every setting and row (median of --timing-steps steps after 3 warm-up steps, one thread), as seconds
per epoch of the setting's training set, beside backprop's (OUT/depth_timing.csv). Run it alone.

    python benchmarks/studies/depth.py [--settings plain-2 ... res-16 resnet18 vit] [--rows bp local frog ...]
                                       [--lrs 0.05 0.1 0.2] [--seeds 0 1] [--epochs 2] [--out runs/depth]
    python benchmarks/studies/depth.py --timing [--settings ...] [--rows ...]
    python benchmarks/studies/depth.py --quick   # a tiny version on digits, for the tests
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import print_result

from frog.activity import blocks_of, stacks_opened
from frog.training.data import Dataset, Split, load_dataset
from frog.training.models import make_model
from frog.training.train import TrainConfig, build_estimator, train

SETTINGS = {
    **{f"plain-{d}": {"model": "fc", "width": 256, "depth": d} for d in (2, 4, 8, 16)},
    **{f"res-{d}": {"model": "resmlp", "width": 256, "depth": d} for d in (2, 4, 8, 16)},
    "resnet18": {"model": "resnet18", "split_stacks": True, "head_channels": 32},
    "vit": {"model": "vit", "head_tokens": "first"},
    # the gap table's networks, for local learning against frog with guesses at an equal step-size search
    "fc256": {"model": "fc", "width": 256},
    "fc1024": {"model": "fc", "width": 1024},
    "resnet18-stages": {"model": "resnet18", "head_channels": 32},  # the paper's blocks: stem, 4 stages, head
}
MLP_SETTINGS = [name for name in SETTINGS if name.startswith(("plain-", "res-"))]
IMAGE_MODELS = ("resnet18", "vit")  # --train-size cuts their training set
FROG = {"gradient": "frog", "engine": "sim", "guess": "local"}
ROWS = {  # name -> (TrainConfig changes, k: "16" (max(16, L + 4)), "L", "2L" (max(16, 2 L + 4)), "G" (2 L - 1),
# "4L" (four parts of one guess per block), or None)
    "bp": ({"gradient": "bp"}, None),
    "local": ({"gradient": "local"}, None),
    "frog": (FROG, "16"),
    "frog-kL": (FROG, "L"),
    "frog-topdown": ({**FROG, "guess": "topdown"}, "16"),
    "frog-topdown-kL": ({**FROG, "guess": "topdown"}, "L"),
    "topdown": ({"gradient": "local", "guess": "topdown"}, None),
}
VARIANTS = {  # the levers of frog beyond its guesses (--rows)
    "frog-hybrid": ({**FROG, "local_weight": 1.0}, "16"),  # L + sum_b L_b: the local part exact, frog the global
    "frog-hybrid-pe": ({**FROG, "local_weight": 1.0, "per_example_tangents": True}, "16"),  # and per-example tangents
    "frog-topdown-hybrid": ({**FROG, "guess": "topdown", "local_weight": 1.0}, "16"),
    "frog-both": ({**FROG, "guess": "topdown+local"}, "2L"),  # top-down and head guesses on the stream blocks
    "frog-both-kG": ({**FROG, "guess": "topdown+local"}, "G"),  # the same, guesses only
    "frog-blocklocal": ({**FROG, "block_local": True}, "16"),  # each random tangent inside one block
    "topdown1": ({"gradient": "local", "guess": "topdown1"}, None),  # first-order top-down guesses, used directly
    "frog-topdown1": ({**FROG, "guess": "topdown1"}, "16"),
    "frog-topdown1-kL": ({**FROG, "guess": "topdown1"}, "L"),
    "frog-both1": ({**FROG, "guess": "topdown1+local"}, "2L"),
    "frog-topdown1-split4": ({**FROG, "guess": "topdown1", "guess_pieces": 4}, "4L"),  # 4 coefficients per guess
    "frog-split4": ({**FROG, "guess_pieces": 4}, "4L"),  # the head guesses in 4 parts
}
COLUMNS = ["setting", "depth", "row", "k", "lr", "seed", "epochs", "test_accuracy", "val_accuracy",
           "test_by_epoch", "seconds_per_epoch", "diverged"]
BEST_COLUMNS = ["setting", "depth", "row", "k", "lr", "lrs_tried", "val_accuracy_seed0", "test_accuracy_by_seed",
                "test_accuracy_mean"]


def rows() -> dict[str, tuple[dict, str | None]]:
    return {**ROWS, **VARIANTS}


def num_blocks(config: TrainConfig, data: Dataset) -> int:
    """L, the blocks of the setting's network (each gets one guess)."""
    model = make_model(config.model, data.input_shape, data.num_classes, width=config.width, depth=config.depth)
    return len(stacks_opened(model) if config.split_stacks else blocks_of(model))


def config_of(setting: str, row: str, lr: float, seed: int, epochs: int, data: Dataset, dataset: str) -> TrainConfig:
    changes, k_rule = rows()[row]
    base = TrainConfig(dataset=dataset, lr=lr, seed=seed, epochs=epochs, patience=epochs, lr_schedule="cosine",
                       batch_size=64, **SETTINGS.get(setting, QUICK_SETTINGS.get(setting, {})))
    config = replace(base, **changes)
    if config.gradient == "bp":
        config = replace(config, split_stacks=False)  # backprop has no blocks
    if k_rule is not None:
        blocks = num_blocks(config, data)
        k = {"L": blocks, "16": max(16, blocks + 4), "2L": max(16, 2 * blocks + 4), "G": 2 * blocks - 1,
             "4L": 4 * blocks}[k_rule]
        config = replace(config, num_tangents=k)
    return config


def cut(data: Dataset, train_size: int | None, val_size: int = 5000, test_size: int | None = None) -> Dataset:
    """The first ``train_size`` training images, ``val_size`` validation images and ``test_size`` test
    images (all test images when None); ``data`` as it is when ``train_size`` is None."""
    if train_size is None:
        return data
    return replace(data, train=Split(data.train.x[:train_size], data.train.y[:train_size]),
                   val=Split(data.val.x[:val_size], data.val.y[:val_size]),
                   test=Split(data.test.x[:test_size], data.test.y[:test_size]))


def run_one(config: TrainConfig, data: Dataset, out: Path) -> dict:
    """Train (or read back) one run; its test accuracy per epoch, seconds per epoch, and whether it diverged."""
    metrics = out / "metrics.csv"
    done = None
    if metrics.exists():
        with metrics.open() as f:
            done = list(csv.DictReader(f))
    if not done or (len(done) < config.epochs and done[-1]["diverged"] != "true"):
        done = train(config, out, resume=True, progress=False, log=lambda s: None, data=data)
    return {"test_by_epoch": [float(r["test_accuracy"]) for r in done], "val": float(done[-1]["val_accuracy"]),
            "seconds": statistics.mean(float(r["seconds"]) for r in done),
            "diverged": any(r["diverged"] == "true" for r in done)}


def append(path: Path, columns: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)


def depth_of(setting: str) -> int | str:
    """The depth of an MLP setting (plain-D, res-D), else the setting's name."""
    family, _, depth = setting.partition("-")
    return int(depth) if family in ("plain", "res") else setting


def study(args: argparse.Namespace, datasets: dict[str, Dataset]) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_path = out / "depth.csv"
    if all_path.exists():
        all_path.unlink()  # rewritten from the runs (which are kept)
    best_rows = []
    for setting in args.settings:
        data = datasets[setting]
        for row in args.rows:
            results = {}
            for lr in args.lrs:
                config = config_of(setting, row, lr, args.seeds[0], args.epochs, data, args.dataset)
                results[lr] = (config, run_one(config, data, out / "runs" / setting / row / f"lr{lr:g}-s{args.seeds[0]}"))
            best_lr = max(args.lrs, key=lambda lr: (not results[lr][1]["diverged"], results[lr][1]["val"]))
            tests = []
            for seed in args.seeds:
                config = config_of(setting, row, best_lr, seed, args.epochs, data, args.dataset)
                result = results[best_lr][1] if seed == args.seeds[0] else \
                    run_one(config, data, out / "runs" / setting / row / f"lr{best_lr:g}-s{seed}")
                tests.append(result["test_by_epoch"][-1])
                if seed != args.seeds[0]:
                    results[(best_lr, seed)] = (config, result)
            for key, (config, result) in results.items():
                lr, seed = key if isinstance(key, tuple) else (key, args.seeds[0])
                append(all_path, COLUMNS, {
                    "setting": setting, "depth": depth_of(setting), "row": row,
                    "k": config.num_tangents if config.gradient not in ("bp", "local") else "", "lr": lr, "seed": seed,
                    "epochs": len(result["test_by_epoch"]), "test_accuracy": result["test_by_epoch"][-1],
                    "val_accuracy": result["val"], "test_by_epoch": " ".join(f"{a:.4f}" for a in result["test_by_epoch"]),
                    "seconds_per_epoch": round(result["seconds"], 2), "diverged": result["diverged"]})
            config = results[best_lr][0]
            best = {"setting": setting, "depth": depth_of(setting), "row": row,
                    "k": config.num_tangents if config.gradient not in ("bp", "local") else "", "lr": best_lr,
                    "lrs_tried": " ".join(f"{lr:g}" for lr in args.lrs),
                    "val_accuracy_seed0": results[best_lr][1]["val"],
                    "test_accuracy_by_seed": " / ".join(f"{t:.3f}" for t in tests),
                    "test_accuracy_mean": round(statistics.mean(tests), 4)}
            best_rows.append(best)
            print(f"{setting:<10} {row:<18} k={best['k'] or '-':<3} lr={best_lr:<6g} test {best['test_accuracy_by_seed']}",
                  flush=True)
    with (out / "depth_best.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BEST_COLUMNS)
        writer.writeheader()
        writer.writerows(best_rows)
    return best_rows


def markdown(best_rows: list[dict]) -> str:
    """Settings as rows, the study's rows as columns: test accuracy of each seed (lr)."""
    names = list(dict.fromkeys(r["row"] for r in best_rows))
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for setting in dict.fromkeys(r["setting"] for r in best_rows):
        cells = {r["row"]: f"{r['test_accuracy_by_seed']} ({r['lr']:g})" for r in best_rows if r["setting"] == setting}
        lines.append(f"| {setting} | " + " | ".join(cells.get(n, "") for n in names) + " |")
    return "\n".join(lines)


def plot(best_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [("plain", "plain MLP, width 256"), ("res", "pre-norm residual MLP, width 256")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (family, title) in zip(axes, families, strict=True):
        for row in dict.fromkeys(r["row"] for r in best_rows):
            points = sorted((int(r["depth"]), float(r["test_accuracy_mean"])) for r in best_rows
                            if r["row"] == row and str(r["setting"]).startswith(family + "-"))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=row)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (hidden layers / residual blocks)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing(args: argparse.Namespace, datasets: dict[str, Dataset]) -> list[dict]:
    """Seconds per epoch in true forward mode (median step time x steps per epoch), one thread."""
    torch.set_num_threads(1)
    found = []
    for setting in args.settings:
        data = datasets[setting]
        steps_per_epoch = math.ceil(len(data.train) / 64)
        base_seconds = None
        for row in args.rows:
            config = replace(config_of(setting, row, 0.01, 0, 1, data, args.dataset), engine="jvp")
            seconds = step_seconds(config, data, args.timing_steps)
            base_seconds = seconds if row == "bp" else base_seconds
            result = {"setting": setting, "row": row, "k": config.num_tangents if config.gradient not in ("bp", "local")
                      else "", "ms_per_step": round(1e3 * seconds, 2),
                      "seconds_per_epoch": round(seconds * steps_per_epoch, 1),
                      "over_backprop": round(seconds / base_seconds, 2) if base_seconds else ""}
            found.append(result)
            print(json.dumps(result), flush=True)
    path = Path(args.out) / "depth_timing.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(found[0]))
        writer.writeheader()
        writer.writerows(found)
    return found


def step_seconds(config: TrainConfig, data: Dataset, steps: int) -> float:
    """Median seconds of one training step (estimate + SGD step) of ``config`` on batches of 64."""
    torch.manual_seed(0)
    model = make_model(config.model, data.input_shape, data.num_classes, width=config.width, depth=config.depth)
    blocks = stacks_opened(model) if config.split_stacks and config.gradient != "bp" else None
    estimator = build_estimator(config, data.num_classes, blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        x, y = data.train.x[64 * i:64 * (i + 1)], data.train.y[64 * i:64 * (i + 1)]
        start = time.perf_counter()
        if estimator is None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            estimator.fill_grad(model, lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y, reduction="none"),
                                targets=y)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


QUICK_SETTINGS = {"plain-2": {"model": "fc", "width": 16, "depth": 2}, "res-3": {"model": "resmlp", "width": 16,
                                                                                    "depth": 3}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=MLP_SETTINGS,
                        help="default: the MLPs, plain-D and res-D")
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--plot-rows", nargs="+", default=None, help="the rows drawn in depth.png (default: all)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--train-size", type=int, default=None, help="first N training images of resnet18 and vit")
    parser.add_argument("--val-size", type=int, default=5000, help="with --train-size: first N validation images")
    parser.add_argument("--test-size", type=int, default=None, help="with --train-size: first N test images")
    parser.add_argument("--out", default="runs/depth")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="digits, two tiny settings, one epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.settings, args.dataset, args.epochs, args.lrs, args.seeds = list(QUICK_SETTINGS), "digits", 1, [0.1], [0, 1]
        args.timing_steps = 2
    unknown = [s for s in args.settings if s not in SETTINGS and s not in QUICK_SETTINGS] + \
        [r for r in args.rows if r not in rows()]
    if unknown:
        sys.exit(f"unknown setting or row: {', '.join(unknown)}")
    full = load_dataset(args.dataset, None, split_seed=0)
    datasets = {s: cut(full, args.train_size if SETTINGS.get(s, {}).get("model") in IMAGE_MODELS else None,
                       args.val_size, args.test_size) for s in args.settings}
    if args.timing:
        return timing(args, datasets)
    best = study(args, datasets)
    print(markdown(best))
    plot([r for r in best if args.plot_rows is None or r["row"] in args.plot_rows], Path(args.out) / "depth.png")
    print_result("depth", settings=args.settings, rows=args.rows, best=best)
    return best


if __name__ == "__main__":
    main()
