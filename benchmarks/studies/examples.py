"""Loss curves and step times of the examples under backprop and frog, side by side in one run.

For examples/fashion_cnn.py (Adadelta + StepLR) and examples/char_gpt.py (AdamW) it trains five
copies over the same steps: backprop (bp), frog with weight perturbation by the jvp and the sim
engine, and frog with activity perturbation by the jvp and the sim engine (k = 16, other settings
at their defaults). The copies take their steps in turn (round robin), so a drift of the machine's
speed hits all of them alike; each keeps its own random state, so every curve is the one the
example gives when run alone. Prints the loss averaged over windows of steps, the median step time
and its ratio to backprop, the held-out loss before and after, writes every step to
``--out``/examples.csv, and ends with a line of JSON.

    python benchmarks/studies/examples.py [--examples cnn gpt] [--steps 200] [--window 20] [--out runs/examples]
                                          [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import load_example, print_result

CONFIGS = {  # name -> the example's arguments
    "bp": ["--gradient", "bp"],
    "weight jvp": ["--perturbation", "weight", "--engine", "jvp"],
    "weight sim": ["--perturbation", "weight", "--engine", "sim"],
    "activity jvp": ["--perturbation", "activity", "--engine", "jvp"],
    "activity sim": ["--perturbation", "activity", "--engine", "sim"],
}


def run(name: str, argv: list[str]) -> dict[str, list[dict]]:
    """Every config's records (see the example's ``training``), taking steps in turn."""
    module = load_example(name)
    runs = {config: module.training(module.parse(argv + extra)) for config, extra in CONFIGS.items()}
    states = {config: torch.get_rng_state() for config in CONFIGS}
    records: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    while runs:
        for config in list(runs):
            with torch.random.fork_rng():
                torch.set_rng_state(states[config])
                record = next(runs[config], None)
                states[config] = torch.get_rng_state()
            if record is None:
                del runs[config]
            else:
                records[config].append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", nargs="+", choices=["cnn", "gpt"], default=["cnn", "gpt"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--out", default="runs/examples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arguments = {  # the CNN: 100 steps an epoch, so StepLR takes a step halfway through 200 steps
        "cnn": ("fashion_cnn", ["--steps", str(args.steps), "--train-size", "6400", "--epochs", str(args.steps)]),
        "gpt": ("char_gpt", ["--steps", str(args.steps)]),
    }
    summary, rows = {}, []
    for short in args.examples:
        records = run(*arguments[short])
        steps = {c: [r for r in rs if "step" in r] for c, rs in records.items()}
        held_out = {c: [r["test_loss"] for r in rs if "test_loss" in r] for c, rs in records.items()}
        bp_ms = 1e3 * statistics.median(r["seconds"] for r in steps["bp"])
        windows = range(0, args.steps, args.window)
        print(f"\n{short}: mean training loss over steps (window {args.window}), median step time, held-out loss")
        print(f"{'':<14}" + "".join(f"{f'{w + 1}-{w + args.window}':>10}" for w in windows)
              + f"{'ms/step':>10}{'x bp':>7}{'before':>9}{'after':>9}")
        for config, done in steps.items():
            curve = [statistics.fmean(r["loss"] for r in done[w: w + args.window]) for w in windows]
            ms = 1e3 * statistics.median(r["seconds"] for r in done)
            print(f"{config:<14}" + "".join(f"{v:>10.4f}" for v in curve)
                  + f"{ms:>10.0f}{ms / bp_ms:>7.1f}{held_out[config][0]:>9.4f}{held_out[config][-1]:>9.4f}")
            summary[f"{short} {config}"] = {"curve": [round(v, 4) for v in curve], "ms_per_step": round(ms, 1),
                                            "over_bp": round(ms / bp_ms, 2), "held_out_before": held_out[config][0],
                                            "held_out_after": held_out[config][-1]}
            rows += [{"example": short, "config": config, **r} for r in done]
    with open(out / "examples.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, ["example", "config", "step", "loss", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    print_result("examples", steps=args.steps, threads=torch.get_num_threads(), results=summary)


if __name__ == "__main__":
    main()
