"""Figures of the experiments as PNG files (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .results import Row


def _label(row: Row) -> str:
    normalized = " (normalized)" if str(row["normalized"]) in ("True", "true") else ""
    return f"{row['method']}{normalized}"


def plot_approximation(rows: Sequence[Row], path: Path) -> Path:
    """Cosine similarity and norm ratio against k, one line per method (Fig. 3 / Fig. 5 left).

    One row of panels per dimension n (and per angle when the rows have one).
    """
    groups: dict[tuple[int, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(int(row["n"]), str(row.get("angle") or ""))].append(row)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (n, angle), group in zip(groups, axes, strict=False):
        lines: dict[str, list[Row]] = defaultdict(list)
        for row in groups[(n, angle)]:
            lines[_label(row)].append(row)
        for label, points in lines.items():
            points.sort(key=lambda r: int(r["k"]))
            ks = [int(r["k"]) for r in points]
            for ax, metric in zip(group, ("cosine", "norm_ratio"), strict=False):
                mean = [float(r[f"{metric}_mean"]) for r in points]
                ci = [float(r[f"{metric}_ci"]) for r in points]
                ax.errorbar(ks, mean, yerr=ci, marker="o", ms=3, capsize=2, label=label)
        title = f"n = {n}" + (f", angle {angle} deg" if angle else "")
        group[0].set(title=f"cosine similarity, {title}", xscale="log", xlabel="k", ylim=(-0.05, 1.05))
        group[1].set(title=f"norm ratio, {title}", xscale="log", yscale="log", xlabel="k")
        group[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_optimization(summary: Sequence[Row], path: Path) -> Path:
    """Best value (mean over seeds) against n, one line per (method, k), a panel per function
    (Fig. 4). Styblinski-Tang is divided by n; the others are on a log scale."""
    functions = sorted({str(r["function"]) for r in summary})
    fig, axes = plt.subplots(1, len(functions), figsize=(5.5 * len(functions), 4), squeeze=False)
    for function, ax in zip(functions, axes[0], strict=False):
        lines: dict[str, list[Row]] = defaultdict(list)
        for row in summary:
            if row["function"] == function:
                k = f" k={row['k']}" if row["k"] not in (None, "") else ""
                angle = f" {row['angle']} deg" if row.get("angle") not in (None, "") else ""
                optimizer = f" {row['optimizer']}" if row.get("optimizer", "sgd") != "sgd" else ""
                lines[f"{row['method']}{k}{angle}{optimizer}"].append(row)
        for label, points in sorted(lines.items()):
            points.sort(key=lambda r: int(r["n"]))
            dims = [int(r["n"]) for r in points]
            values = [float(r["best_mean"]) for r in points]
            if function == "styblinski-tang":
                values = [v / n for v, n in zip(values, dims, strict=False)]
            ax.plot(dims, values, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        if function == "styblinski-tang":
            ax.set(ylabel="best value / n")
        else:
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_ylim(bottom=0)
            ax.set(ylabel="best value")
        ax.set(title=function, xlabel="n")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tune(studies: dict[str, Sequence[Row]], path: Path) -> Path:
    """Objective against lr (log scale) for each study of a tune, one panel each: complete trials as
    dots (the best as a star), pruned ones as crosses at their last reported value, diverged ones
    as triangles on the top edge."""
    names = list(studies)
    cols = min(3, len(names))
    rows_ = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.4 * rows_), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for name, ax in zip(names, axes.flat, strict=False):
        trials = studies[name]
        complete = [(float(t["lr"]), float(t["value"])) for t in trials if t["state"] == "complete"]
        pruned = [(float(t["lr"]), float(t["last_value"])) for t in trials
                  if t["state"] == "pruned" and t["last_value"] is not None]
        diverged = [float(t["lr"]) for t in trials if t["state"] == "diverged"]
        if complete:
            ax.scatter(*zip(*complete, strict=True), s=14, label="complete")
            ax.scatter(*min(complete, key=lambda p: p[1]), marker="*", s=140, color="C3", label="best", zorder=3)
        if pruned:
            ax.scatter(*zip(*pruned, strict=True), marker="x", s=18, color="C1", label="pruned")
        values = [v for _, v in complete + pruned]
        positive = [v for v in values if v > 0]
        if values and min(values) >= 0 and positive and max(values) > 100 * min(positive):
            ax.set_yscale("symlog", linthresh=min(positive))  # log scale that also shows exact zeros
            ax.set_ylim(bottom=0)
        if diverged:
            top = max(values) if values else 1.0
            ax.scatter(diverged, [top] * len(diverged), marker="^", s=18, color="C7", label="diverged")
        ax.set_xscale("log")
        ax.set(title=textwrap.fill(name.split(" ", 1)[-1].replace("gradient_approach=", ""), 50), xlabel="lr",
               ylabel="objective")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
