"""The ``frog`` command line: each subcommand wires library calls together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .engines import ENGINES
from .functions import FUNCTIONS
from .methods import METHOD_NAMES
from .results import prepare_out_dir


def _add_optimize(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("optimize", help="gradient descent on closed-form functions (paper Fig. 4)")
    p.add_argument("--function", nargs="+", default=["styblinski-tang"], choices=list(FUNCTIONS))
    p.add_argument("--dims", nargs="+", type=int, default=[64], help="dimensions n")
    p.add_argument("--tangents", "-k", nargs="+", type=int, default=[1, 2, 4, 16], help="numbers of tangents k")
    p.add_argument("--methods", nargs="+", default=["bp", "fg-mean", "frog"], help=f"of {', '.join(METHOD_NAMES)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the paper's per function)")
    p.add_argument("--lr", type=float, default=None, help="step size (default: the paper's table)")
    p.add_argument("--engine", default="jvp", choices=list(ENGINES))
    p.add_argument("--out", default=None, help="folder for optimization.csv (rows are written as runs end)")
    p.set_defaults(handler=_optimize)


def _optimize(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .experiments.optimization import plan_runs, run_all

    runs = plan_runs(args.function, args.dims, args.tangents, args.methods, args.seeds, args.lr)
    out = prepare_out_dir(args.out) if args.out else None
    write = tqdm.write
    write(f"{'function':<16} {'n':>5} {'method':<8} {'k':>3} {'seed':>4} {'best value':>14} {'minimum':>14}")
    for row in run_all(runs, out, engine=args.engine, steps=args.steps):
        minimum = FUNCTIONS[str(row["function"])].minimum(int(row["n"]))
        flag = "  (diverged)" if row["diverged"] else ""
        k = row["k"] if row["k"] is not None else "-"
        write(
            f"{row['function']:<16} {row['n']:>5} {row['method']:<8} {k:>3} {row['seed']:>4} "
            f"{row['best_value']:>14.4f} {minimum:>14.4f}{flag}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frog", description="Multi-tangent forward gradients.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_optimize(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frog`` console script; bad input ends with a one-line error, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"frog: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frog: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
