"""Closed-form optimization (the paper's Fig. 4; with angle tangents Fig. 5).

Results: docs/reproducing.md, "Closed-form optimization (Fig. 4)" and "Tangents at a fixed angle (Fig. 5)".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..estimator import ForwardGradient
from ..tangents import check_kind
from ..training.functions import get_function
from ..training.lrs import math_lr, table_lr
from ..training.methods import PAPER_METHODS, check_method_name, estimator_for
from ..training.optimize import DescentResult, gradient_descent
from ..training.results import CsvLog, Row, text
from ..training.strategies import DEFAULT_LR, check_strategy

COLUMNS = ["function", "n", "method", "k", "seed", "lr", "best_value", "final_value", "steps", "diverged",
           "engine", "sampler", "angle", "optimizer", "extra_forward_passes_per_step"]
KEY = ("function", "n", "method", "k", "seed", "sampler", "angle", "optimizer")


@dataclass(frozen=True)
class Run:
    """One gradient-descent run; k is None for bp."""

    function: str
    n: int
    method: str
    k: int | None
    seed: int
    lr: float
    angle: float | None = None
    optimizer: str = "sgd"

    def key(self) -> tuple[str, ...]:
        sampler = "angle" if self.angle is not None else "normal"
        values = (self.function, self.n, self.method, self.k, self.seed, sampler, self.angle, self.optimizer)
        return tuple(text(v) for v in values)


def step_size(
    function: str,
    n: int,
    method: str,
    k: int | None,
    angle: float | None = None,
    *,
    optimizer: str = "sgd",
    lr_table: str | Path | None = None,
) -> float:
    """The step size of a run: from ``lr_table`` when given, else the paper's table for ``sgd``,
    else the strategy's default (:data:`frog.training.strategies.DEFAULT_LR`)."""
    k = None if method == "bp" else k
    if lr_table is not None:
        return table_lr(lr_table, optimizer, function=function, n=n, gradient_approach=method, k=k, angle=angle)
    return math_lr(function, n, method, k, angle) if optimizer == "sgd" else DEFAULT_LR[optimizer]


def plan_runs(
    functions: Sequence[str],
    dims: Sequence[int],
    tangents: Sequence[int],
    methods: Sequence[str],
    seeds: Sequence[int],
    lr: float | None = None,
    angles: Sequence[float] | None = None,
    *,
    optimizer: str = "sgd",
    lr_table: str | Path | None = None,
    lr_scale: float = 1.0,
) -> list[Run]:
    """All runs, with step sizes ``lr``, or else from :func:`step_size`, times ``lr_scale``.

    bp runs once per (function, n, seed). frog at k = 1 is skipped: it spans the same line as the
    single-tangent baseline, which the paper lists as fg-mean k = 1. Raises ValueError for bad
    arguments or a step size missing from the table.
    """
    for name in functions:
        get_function(name)
    for method in methods:
        check_method_name(method)
        if method not in PAPER_METHODS:
            raise ValueError(f"{method} perturbs a model's weights in place: use it with frog train (--gradient "
                             f"{method}) or frog.MeZO; frog optimize compares {', '.join(PAPER_METHODS)}")
    if any(n < 1 for n in dims) or any(k < 1 for k in tangents):
        raise ValueError("dimensions n and tangent counts k must be >= 1")
    for a in angles or []:
        check_kind("angle", a)
    check_strategy(optimizer)
    if lr is not None and lr_table is not None:
        raise ValueError("give --lr or --lr-table, not both")
    if not lr_scale > 0:
        raise ValueError(f"--lr-scale must be > 0, got {lr_scale}")
    runs: list[Run] = []
    for function in functions:
        for n in dims:
            for method in methods:
                ks = [None] if method == "bp" else [k for k in tangents if not (method == "frog" and k == 1)]
                for k in ks:
                    for angle in ([None] if method == "bp" or not angles else angles):
                        step = lr if lr is not None else step_size(function, n, method, k, angle,
                                                                   optimizer=optimizer, lr_table=lr_table)
                        runs.extend(Run(function, n, method, k, seed, step * lr_scale, angle, optimizer)
                                    for seed in seeds)
    return runs


def run_all(
    runs: Sequence[Run],
    out_dir: Path | None,
    *,
    engine: str = "jvp",
    steps: int | None = None,
    progress: bool = True,
) -> Iterator[Row]:
    """Run each planned run, append its row to ``out_dir/optimization.csv`` as it ends, and yield it.

    Runs already in the CSV are skipped (a rerun resumes).
    """
    # files from before the step-size strategies: plain SGD, no extra forward passes
    older = {"optimizer": "sgd", "extra_forward_passes_per_step": 0.0}
    log = CsvLog(out_dir / "optimization.csv", COLUMNS, older) if out_dir is not None else None
    done = log.done(KEY) if log is not None else set()
    for run in tqdm(runs, desc="optimize", disable=not progress, unit="run"):
        if run.key() in done:
            continue
        result = descend(run, engine=engine, steps=steps)
        row = {
            "function": run.function, "n": run.n, "method": run.method, "k": run.k, "seed": run.seed,
            "lr": run.lr, "best_value": result.best_value, "final_value": result.final_value,
            "steps": result.steps, "diverged": result.diverged, "engine": engine if run.k else "autograd",
            "sampler": "angle" if run.angle is not None else "normal", "angle": run.angle,
            "optimizer": run.optimizer, "extra_forward_passes_per_step": result.extra_forward_passes / max(result.steps, 1),
        }
        if log is not None:
            log.append(row)
        yield row


def descend(
    run: Run, *, engine: str = "jvp", steps: int | None = None, on_step: Callable[[int, float], None] | None = None
) -> DescentResult:
    """One run: descent on its function from the paper's start, ``steps`` steps (default: the
    function's budget); ``on_step(t, best)`` as in :func:`frog.training.optimize.gradient_descent`."""
    function = get_function(run.function)
    options = {"engine": engine, "seed": run.seed, "scale_correction": False}  # the paper's plain estimators
    if run.angle is not None:
        options.update(sampler="angle", angle=run.angle)
    estimator = estimator_for(run.method, run.k or 1, **options)
    if estimator is not None and not isinstance(estimator, ForwardGradient):  # plan_runs admits the paper's methods only
        raise ValueError(f"{run.method} perturbs a model's weights: frog optimize runs {', '.join(PAPER_METHODS)}")
    total = function.steps if steps is None else steps
    return gradient_descent(function, function.start(run.n), run.lr, total, estimator,
                            optimizer=run.optimizer, on_step=on_step)


SUMMARY_COLUMNS = ["function", "n", "method", "k", "angle", "optimizer", "runs", "diverged", "best_mean", "best_std",
                   "minimum", "extra_forward_passes_per_step"]


def summarize(rows: Sequence[Row]) -> list[Row]:
    """Mean and standard deviation over seeds of the best value, per (function, n, method, k, angle,
    optimizer); the strategy's extra forward passes per step, averaged over the seeds.

    Diverged runs count with the best value they reached before diverging.
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        key = tuple(text(row[c]) for c in ("function", "n", "method", "k", "angle", "optimizer"))
        groups[key].append(row)
    summary = []
    for (function, n, method, k, angle, optimizer), members in groups.items():
        best = [float(r["best_value"]) for r in members]
        mean = sum(best) / len(best)
        std = math.sqrt(sum((b - mean) ** 2 for b in best) / (len(best) - 1)) if len(best) > 1 else 0.0
        summary.append({
            "function": function, "n": int(n), "method": method, "k": k, "angle": angle, "optimizer": optimizer,
            "runs": len(members), "diverged": sum(str(r["diverged"]) in ("True", "true") for r in members),
            "best_mean": mean, "best_std": std, "minimum": get_function(function).minimum(int(n)),
            "extra_forward_passes_per_step": sum(float(r["extra_forward_passes_per_step"] or 0) for r in members)
            / len(members),
        })
    return summary


