"""The ``frog`` command line: each subcommand wires library calls together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .distributed import DistributedError
from .engines import ENGINES
from .training.functions import FUNCTIONS
from .training.methods import METHOD_NAMES, PAPER_METHODS
from .training.results import prepare_out_dir, read_csv, write_csv
from .training.strategies import LR_SCHEDULES, STRATEGIES

POWERS_OF_TWO = [2**i for i in range(11)]


def _add_sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="normal", choices=["normal", "angle"],
                   help="tangent sampler (angle: every tangent at --angles degrees to the first)")
    p.add_argument("--angles", nargs="+", type=float, default=[15.0, 30.0, 45.0, 60.0, 75.0, 90.0],
                   help="angles in degrees, in (0, 90], for --sampler angle")


def _add_approx(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("approx", help="approximation quality of the estimators (paper Fig. 3 and 5)")
    p.add_argument("--dims", nargs="+", type=int, default=[64], help="dimensions n")
    p.add_argument("--tangents", "-k", nargs="+", type=int, default=POWERS_OF_TWO, help="numbers of tangents k")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--true-gradient", default="ones", choices=["ones", "random"])
    p.add_argument("--seed", type=int, default=0)
    _add_sampler_options(p)
    p.add_argument("--out", default="runs/approx", help="folder for approximation.csv and approximation.png")
    p.set_defaults(handler=_approx)


def _approx(args: argparse.Namespace) -> None:
    from .experiments.approximation import sweep
    from .training.plots import plot_approximation

    out = prepare_out_dir(args.out)
    rows = list(sweep(args.dims, args.tangents, args.samples, sampler=args.sampler, angles=args.angles,
                      gradient=args.true_gradient, seed=args.seed, out_dir=out))
    plot_approximation(rows, out / "approximation.png")
    print(f"{'n':>6} {'k':>5} {'method':<9} {'normalized':<10} {'cosine':>16} {'norm ratio':>18}"
          + ("  angle" if args.sampler == "angle" else ""))
    for r in rows:
        angle = f"  {r['angle']}" if args.sampler == "angle" else ""
        print(f"{r['n']:>6} {r['k']:>5} {r['method']:<9} {str(r['normalized']).lower():<10} "
              f"{float(r['cosine_mean']):>8.4f}±{float(r['cosine_ci']):<7.4f} "
              f"{float(r['norm_ratio_mean']):>9.4f}±{float(r['norm_ratio_ci']):<8.4f}{angle}")
    print(f"wrote {out / 'approximation.csv'} and {out / 'approximation.png'}")


def _optimize_options(p: argparse.ArgumentParser, tune: bool = False) -> None:
    """Options of ``frog optimize``; under ``frog tune`` without the step-size ones (lr is searched)."""
    p.add_argument("--function", nargs="+", default=["styblinski-tang"], help=f"of {', '.join(FUNCTIONS)}")
    p.add_argument("--dims", nargs="+", type=int, default=[64], help="dimensions n")
    p.add_argument("--tangents", "-k", nargs="+", type=int, default=[1, 2, 4, 16], help="numbers of tangents k")
    p.add_argument("--methods", nargs="+", default=["bp", "fg-mean", "frog"], help=f"of {', '.join(PAPER_METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0] if tune else [0, 1, 2, 3, 4],
                   help="seeds of each run" + (" (the objective is the mean of their best values)" if tune else ""))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the paper's per function)")
    _add_optimizer_option(p)
    if not tune:
        p.add_argument("--lr", type=float, default=None, help="step size (default: the paper's table for sgd)")
        p.add_argument("--lr-table", default=None, help="CSV of step sizes instead of the paper's, e.g. a tune's lrs.csv")
        p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every step size by this factor")
    p.add_argument("--engine", default="jvp", choices=list(ENGINES))
    _add_sampler_options(p)


def _add_optimizer_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", default="sgd", choices=list(STRATEGIES),
                   help="step-size strategy: sgd (x - lr g), adam (default lr 1e-3), line-search (Armijo, "
                        "forward passes only; lr = first trial step, default 1) or normalized (steps of length "
                        "lr / sqrt(t + 1), default lr 1)")


def _add_optimize(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("optimize", help="gradient descent on closed-form functions (paper Fig. 4)")
    _optimize_options(p)
    p.add_argument("--out", default="runs/optimize", help="folder for optimization.csv, the summary and the plot")
    p.set_defaults(handler=_optimize)


def _optimize(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .experiments.optimization import SUMMARY_COLUMNS, plan_runs, run_all, summarize
    from .training.plots import plot_optimization

    angles = args.angles if args.sampler == "angle" else None
    runs = plan_runs(args.function, args.dims, args.tangents, args.methods, args.seeds, args.lr, angles,
                     optimizer=args.optimizer, lr_table=args.lr_table, lr_scale=args.lr_scale)
    out = prepare_out_dir(args.out)
    tqdm.write(f"{'function':<16} {'n':>5} {'method':<8} {'k':>3} {'seed':>4} {'best value':>14} {'minimum':>14}")
    for row in run_all(runs, out, engine=args.engine, steps=args.steps):
        minimum = FUNCTIONS[str(row["function"])].minimum(int(row["n"]))
        flag = f"  (diverged at step {row['steps']})" if row["diverged"] else ""
        angle = f"  angle {row['angle']:g}" if row["angle"] is not None else ""
        k = row["k"] if row["k"] is not None else "-"
        tqdm.write(f"{row['function']:<16} {row['n']:>5} {row['method']:<8} {k:>3} {row['seed']:>4} "
                   f"{row['best_value']:>14.4f} {minimum:>14.4f}{angle}{flag}")
    summary = summarize(read_csv(out / "optimization.csv")[1])
    write_csv(out / "optimization_summary.csv", SUMMARY_COLUMNS, summary)
    plot_optimization(summary, out / "optimization.png")
    print(f"wrote {out / 'optimization.csv'}, optimization_summary.csv and optimization.png")


def _add_reproduce(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("reproduce", help="run Fig. 3, 4 and 5 of the paper and write REPORT.md")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores instead of hours")
    p.add_argument("--engine", default="jvp", choices=list(ENGINES), help="engine of the closed-form experiments")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset of the full variant's network experiment")
    p.add_argument("--data-dir", default=None, help="folder with that dataset's files")
    p.add_argument("--out", default="runs/reproduce")
    p.set_defaults(handler=_reproduce)


def _reproduce(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .experiments.reproduce import FULL, QUICK, reproduce

    settings = QUICK if args.quick else replace(FULL, networks=tuple(
        replace(runs, datasets=[args.dataset], data_dir=args.data_dir) for runs in FULL.networks))
    print(settings.note, flush=True)
    report = reproduce(prepare_out_dir(args.out), settings, engine=args.engine)
    print(Path(report).read_text())
    print(f"wrote {report}")


def _train_options(p: argparse.ArgumentParser, tune: bool = False) -> None:
    """Options of ``frog train``; under ``frog tune`` width, gradient and k take several values and
    the step-size, resume and distributed options are left out."""
    from .training.train import GUESSES, TRAIN_SAMPLERS, TrainConfig

    d = TrainConfig()
    several: dict[str, Any] = {"nargs": "+"} if tune else {}
    p.add_argument("--model", default=d.model, help="fc, resmlp (pre-norm residual MLP), conv, resnet18 or vit")
    p.add_argument("--width", type=int, default=[d.width] if tune else d.width,
                   help="hidden width of the fc and resmlp models", **several)
    p.add_argument("--depth", type=int, default=d.depth,
                   help="hidden layers of fc (the paper: 2), residual blocks of resmlp")
    p.add_argument("--split-stacks", action="store_true",
                   help="activity perturbation and local learning: every module of a stack (a ResNet stage's "
                        "BasicBlocks) is a block of its own")
    p.add_argument("--dataset", default=d.dataset, help="digits (embedded), fashion-mnist, mnist or cifar10")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--gradient", default=[d.gradient] if tune else d.gradient, help=f"of {', '.join(METHOD_NAMES)}",
                   **several)
    p.add_argument("--tangents", "-k", type=int, default=[d.num_tangents] if tune else d.num_tangents, **several)
    p.add_argument("--engine", default=d.engine, help="jvp (true forward mode), loop, sim (same numbers by autograd, except with BatchNorm in "
                   "train mode under activity perturbation) or fd")
    p.add_argument("--perturbation", default=d.perturbation, help="activity (as the paper) or weight")
    p.add_argument("--sampler", default=d.sampler, choices=list(TRAIN_SAMPLERS),
                   help="tangents: normal (default), rademacher, or with --perturbation weight the structured "
                        "lowrank (U V^T / sqrt(rank) per weight matrix) and input-span (right factors in the span "
                        "of each layer's inputs)")
    p.add_argument("--rank", type=int, default=d.rank, help="rank r of lowrank / input-span tangents")
    p.add_argument("--guess", default=None, choices=list(GUESSES),
                   help="guessed tangents (activity): the first L of the k tangents are per-example guesses of the "
                        "block outputs' gradients: local, from a small auxiliary head per hidden block and the loss's "
                        "own gradient at the last (default lr: backprop's); topdown, the gradient at the last block's "
                        "input for every block of that shape (a residual stream), heads elsewhere; topdown1, the same "
                        "with the first-order terms of the blocks above; topdown+local, both on the stream's blocks. With --gradient local: the guesses used directly as the "
                        "blocks' gradients (default: local)")
    p.add_argument("--guess-pieces", type=int, default=d.guess_pieces,
                   help="with --guess: cut each guess into this many parts along its features, one tangent each, so "
                        "that frog fits one coefficient per part")
    p.add_argument("--block-local-tangents", action="store_true",
                   help="activity perturbation: each random tangent lives in one block (row j in block j mod L)")
    p.add_argument("--local-weight", type=float, default=d.local_weight,
                   help="with --guess: the hybrid objective L + alpha sum_b L_b; every hidden block's estimate gains "
                        "alpha times its guess used as it is (its local loss's gradient for local heads)")
    p.add_argument("--per-example-tangents", action="store_true",
                   help="independent random activity tangents per example, zero at inactive ReLU units")
    p.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="SGD step size of the local heads (--guess, --gradient local)")
    p.add_argument("--head-channels", type=int, default=d.head_channels,
                   help="--guess local: each head starts with a layer to this many channels and a ReLU at every "
                        "position (a 3x3 convolution on images, a Linear per token), so the guess varies over the "
                        "positions (0: pooling and a Linear only)")
    p.add_argument("--head-tokens", default=d.head_tokens, choices=["mean", "first"],
                   help="--guess local on token blocks (B, T, C): the heads read the mean over tokens or the first "
                        "token (first: for networks that classify from a class token, as the vit model)")
    p.add_argument("--mezo-eps", type=float, default=d.mezo_eps,
                   help="--gradient mezo: the perturbation's scale eps (MeZO's 1e-3); -k sets its directions per step")
    _add_optimizer_option(p)
    if not tune:
        p.add_argument("--lr", type=float, default=None, help="step size (default: the paper's table for sgd)")
        p.add_argument("--lr-table", default=None, help="CSV of step sizes instead of the paper's, e.g. a tune's lrs.csv")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=list(LR_SCHEDULES),
                   help="constant (the paper) or cosine: the step size decays from --lr towards 0 over --epochs")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping on the validation loss")
    p.add_argument("--batch-size", type=int, default=None, help="default 64, 128 for cifar10")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the run" + (" (and of the search)" if tune else ""))
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--tangent-budget-mb", type=float, default=d.tangent_budget_mb,
                   help="memory for the tangents of one jvp pass; beyond it the jvp engine runs in chunks")
    if tune:
        return
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--distributed", default=None, choices=["tangent", "data"],
                   help="under torchrun: split the tangents (tangent) or the batch (data) over the ranks")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds before the ranks give up on a rank that died or hangs")


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a network with backprop or forward gradients (paper Sec. 4.4-4.5)")
    _train_options(p)
    p.add_argument("--out", default="runs/train", help="folder for metrics.csv, config.json, checkpoint.pt")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .training.train import TrainConfig, train

    config = TrainConfig(
        model=args.model, width=args.width, depth=args.depth, split_stacks=args.split_stacks, dataset=args.dataset,
        data_dir=args.data_dir, gradient=args.gradient,
        num_tangents=args.tangents, engine=args.engine, perturbation=args.perturbation, sampler=args.sampler,
        rank=args.rank, lr=args.lr,
        epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, seed=args.seed, device=args.device,
        tangent_budget_mb=args.tangent_budget_mb, optimizer=args.optimizer, lr_table=args.lr_table,
        lr_schedule=args.lr_schedule, guess=args.guess, per_example_tangents=args.per_example_tangents,
        block_local=args.block_local_tangents, local_weight=args.local_weight, guess_pieces=args.guess_pieces,
        head_lr=args.head_lr, head_channels=args.head_channels, head_tokens=args.head_tokens, mezo_eps=args.mezo_eps,
    )
    communicator = None
    if args.distributed:
        from .distributed import Communicator, init_from_environment

        init_from_environment(args.device, args.dist_timeout)
        communicator = Communicator(args.distributed)
    try:
        rows = train(config, prepare_out_dir(args.out), resume=args.resume, log=tqdm.write, communicator=communicator)
    finally:
        if communicator is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rows and (communicator is None or communicator.rank == 0):
        last = rows[-1]
        print(f"epoch {last['epoch']}: test accuracy {float(last['test_accuracy']):.4f}; wrote {args.out}/metrics.csv")


TUNE_HELP = """Search the learning rate of each setting with Optuna (TPE over log10 lr, median pruning).

One study per setting (function, n, method, k; or model, dataset, method, k), stored in SQLite in
--out (or --storage); a rerun continues to --trials and never repeats a finished trial. Writes
lrs.csv (the paper's table format: use it with --lr-table), trials.csv and tune.png. The default
--lr-range is 4 decades around a guess: [guess / 100, guess * 100], the guess being the paper's
step size for the setting (sgd; 1e-2 where the paper has none) or the optimizer's default lr."""


def _add_tune(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("tune", help="search learning rates with Optuna (optimize or train)", description=TUNE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, add_options in (("optimize", _optimize_options), ("train", _train_options)):
        q = kinds.add_parser(kind, help=f"tune the step sizes of `frog {kind}`", description=TUNE_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(q, tune=True)
        q.add_argument("--trials", type=int, required=True, help="trials per setting (complete, pruned or diverged)")
        q.add_argument("--out", default=f"runs/tune-{kind}", help="folder for lrs.csv, trials.csv, tune.png, tune.db")
        q.add_argument("--storage", default=None,
                       help="Optuna RDB URL (default: sqlite in --out), e.g. postgresql://user:pw@host/db to let "
                            "workers on several machines join one study")
        q.add_argument("--workers", type=int, default=1, help="processes on this machine")
        q.add_argument("--lr-range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                       help="search range of lr (default: [guess / 100, guess * 100], see above)")
        if kind == "optimize":
            q.add_argument("--seed", type=int, default=0, help="seed of the search")
        q.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .experiments import tune
    from .training.train import TrainConfig

    tune.check_options(args.trials, args.lr_range, args.workers)
    if args.kind == "optimize":
        angles = args.angles if args.sampler == "angle" else None
        settings = tune.optimize_settings(args.function, args.dims, args.tangents, args.methods, seeds=args.seeds,
                                          steps=args.steps, engine=args.engine, optimizer=args.optimizer, angles=angles)
    else:
        base = replace(TrainConfig(), model=args.model, depth=args.depth, split_stacks=args.split_stacks,
                       dataset=args.dataset, engine=args.engine,
                       perturbation=args.perturbation, sampler=args.sampler, rank=args.rank,
                       epochs=args.epochs, patience=args.patience,
                       batch_size=args.batch_size, seed=args.seed, device=args.device,
                       tangent_budget_mb=args.tangent_budget_mb, optimizer=args.optimizer,
                       lr_schedule=args.lr_schedule, guess=args.guess,
                       per_example_tangents=args.per_example_tangents, head_lr=args.head_lr,
                       block_local=args.block_local_tangents, local_weight=args.local_weight,
                       guess_pieces=args.guess_pieces,
                       head_channels=args.head_channels, head_tokens=args.head_tokens, mezo_eps=args.mezo_eps)
        settings = tune.train_settings(base, args.width, args.gradient, args.tangents)
    out = prepare_out_dir(args.out)
    job = tune.TuneJob(tuple(settings), args.trials, out, args.storage or tune.default_storage(out), seed=args.seed,
                       workers=args.workers, lr_range=tuple(args.lr_range) if args.lr_range else None,
                       data_dir=getattr(args, "data_dir", None))
    best = tune.run(job)
    for row in best:
        print(f"{' '.join(f'{c}={row[c]}' for c in tune.SETTING_COLUMNS[args.kind] if row.get(c) is not None)}: "
              f"lr {float(row['lr']):.4g}, objective {float(row['objective']):.6g} ({row['trials']} trials)")
    print(f"wrote {out / 'lrs.csv'}, trials.csv and tune.png ({job.storage})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frog", description="Multi-tangent forward gradients.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_approx(commands)
    _add_optimize(commands)
    _add_reproduce(commands)
    _add_train(commands)
    _add_tune(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frog`` console script; bad input ends with a one-line error, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, DistributedError) as error:
        print(f"frog: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frog: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
