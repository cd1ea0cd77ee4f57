"""The depth study's language model: the char GPT of examples/char_gpt.py with backprop, local learning and
frog with guesses (token heads, top-down guesses), AdamW, held-out loss (lower is better).

Every row gets the same step-size grid (--lrs) with seed 0; the step size with the lowest held-out loss is
then run with every other seed (--seeds). The held-out loss is the example's: 64 fixed windows of the last
tenth of the text (GPL-3), so the same windows choose the step size and report the result (there is no
third split). The GPT has --depth blocks of width 64, 4 heads, context 64, dropout 0.1; batch 32, --steps
steps. frog rows use the ``sim`` engine (forward mode gives the same estimates up to rounding).
Writes OUT/depth_gpt.csv (every run, as it finishes; a rerun skips those there) and prints the best table.

    python benchmarks/studies/depth_gpt.py [--rows bp local frog ...] [--lrs 3e-4 1e-3 3e-3] [--seeds 0 1]
                                           [--depth 4] [--steps 300] [--out runs/depth]
    python benchmarks/studies/depth_gpt.py --quick
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_example, print_result

FROG = ["--gradient", "frog", "--engine", "sim"]
ROWS = {  # name -> (arguments of examples/char_gpt.py, k: "16" (max(16, L + 4)), "L" or None)
    "bp": (["--gradient", "bp"], None),
    "local": (["--gradient", "local"], None),
    "frog": ([*FROG, "--guess", "local"], "16"),
    "frog-kL": ([*FROG, "--guess", "local"], "L"),
    "frog-topdown": ([*FROG, "--guess", "topdown"], "16"),
    "topdown": (["--gradient", "local", "--guess", "topdown"], None),
    "topdown1": (["--gradient", "local", "--guess", "topdown1"], None),
    "frog-topdown1": ([*FROG, "--guess", "topdown1"], "16"),
}
COLUMNS = ["row", "depth", "k", "lr", "seed", "steps", "held_out_loss", "seconds"]


def blocks(depth: int) -> int:
    """L: token and position embeddings, the transformer blocks, the final norm, the tied output layer."""
    return depth + 4


def run(row: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    extra, k_rule = ROWS[row]
    k = {"L": blocks(args.depth), "16": max(16, blocks(args.depth) + 4), None: None}[k_rule]
    argv = [*extra, "--lr", str(lr), "--seed", str(seed), "--steps", str(args.steps), "--depth", str(args.depth)]
    argv += ["-k", str(k)] if k else []
    argv += ["--batch-size", "8", "--context", "32"] if args.quick else []
    gpt = load_example("char_gpt")
    start = time.perf_counter()
    records = list(gpt.training(gpt.parse(argv)))
    loss = [r["test_loss"] for r in records if "test_loss" in r][-1]
    return {"row": row, "depth": args.depth, "k": k or "", "lr": lr, "seed": seed, "steps": args.steps,
            "held_out_loss": round(loss, 4), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/depth")
    parser.add_argument("--quick", action="store_true", help="2 rows, 3 steps of batch 8, one step size")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.lrs, args.seeds, args.steps, args.depth = ["bp", "local"], [1e-3], [0, 1], 3, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "depth_gpt.csv"
    done = {}
    if path.exists():
        with path.open() as f:
            done = {(r["row"], int(r["depth"]), float(r["lr"]), int(r["seed"]), int(r["steps"])): r
                    for r in csv.DictReader(f)}

    def result(row: str, lr: float, seed: int) -> dict:
        key = (row, args.depth, lr, seed, args.steps)
        if key not in done:
            done[key] = run(row, lr, seed, args)
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow(done[key])
        return done[key]

    best_rows = []
    for row in args.rows:
        first = {lr: float(result(row, lr, args.seeds[0])["held_out_loss"]) for lr in args.lrs}
        lr = min(args.lrs, key=lambda lr: first[lr])
        losses = [float(result(row, lr, seed)["held_out_loss"]) for seed in args.seeds]
        best_rows.append({"row": row, "depth": args.depth, "lr": lr, "held_out_loss_by_seed": losses,
                          "mean": round(statistics.mean(losses), 4)})
        print(f"{row:<15} lr={lr:<7g} held-out loss {' / '.join(f'{x:.3f}' for x in losses)}", flush=True)
    print_result("depth_gpt", depth=args.depth, steps=args.steps, lrs=args.lrs, best=best_rows)
    return best_rows


if __name__ == "__main__":
    main()
