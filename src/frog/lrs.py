"""The paper's step sizes, shipped as package data (``frog/lrs/*.csv``)."""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

TABLES = ("math", "math__custom_tangents", "fc_nns", "sota_nns")


@cache
def load_table(name: str) -> tuple[dict[str, str], ...]:
    """Rows of the table ``name`` (one of TABLES) as dicts of strings."""
    if name not in TABLES:
        raise ValueError(f"unknown learning-rate table {name!r}; choose one of {', '.join(TABLES)}")
    with resources.files("frog").joinpath("lrs", f"{name}.csv").open(newline="") as handle:
        return tuple(csv.DictReader(handle))


def _k_of(text: str) -> int | None:
    return int(float(text)) if text else None


def lookup(table: str, **key: object) -> float:
    """The ``lr`` of the unique row of ``table`` whose columns equal ``key``.

    ``k`` is compared as an integer (None for bp); other values as strings. Raises ValueError
    naming the missing combination.
    """
    for row in load_table(table):
        if all(_k_of(row[c]) == v if c == "k" else row[c] == str(v) for c, v in key.items()):
            return float(row["lr"])
    described = ", ".join(f"{c}={v}" for c, v in key.items())
    raise ValueError(f"the paper's table {table}.csv has no step size for {described}; give one with --lr")


def math_lr(function: str, n: int, method: str, k: int | None, angle: float | None = None) -> float:
    """Step size of the closed-form experiments (Fig. 4; Fig. 5 when ``angle`` is given).

    The paper tuned frog once with normal tangents for Fig. 5 (its span does not depend on the angle).
    """
    k = None if method == "bp" else k
    if angle is None:
        return lookup("math", function=function, n=n, gradient_approach=method, k=k)
    sampler = "normal" if method == "frog" else f"specific_angle_{angle:g}"
    optimizer = f"FG(k={k},agg={'orthogonal_projection' if method == 'frog' else 'mean'},normalize=False,sampler={sampler})"
    return lookup("math__custom_tangents", function=function, n=n, gradient_approach=method, k=k, optimizer=optimizer)


def network_lr(model: str, width: int, dataset: str, method: str, k: int | None) -> tuple[float, str]:
    """Step size of the network experiments (``fc_nns.csv``, ``sota_nns.csv``) and where it came from.

    The paper tuned MNIST and CIFAR-10 only: Fashion-MNIST and digits use the MNIST row.
    """
    k = None if method == "bp" else k
    table_dataset = dataset if dataset in ("mnist", "cifar10") else "mnist"
    if model == "fc":
        table, row_model = "fc_nns", f"fc_w={width}"
    elif model in ("resnet18", "vit"):
        table, row_model = "sota_nns", model
    else:
        raise ValueError(f"the paper has no step size for model {model!r}; give one with --lr")
    lr = lookup(table, model=row_model, dataset=table_dataset, gradient_approach=method, k=k)
    note = f"paper's {table}.csv, {row_model}, {table_dataset}, {method}" + (f", k={k}" if k else "")
    if table_dataset != dataset:
        note += f" (the paper has no {dataset} row: using its MNIST row)"
    return lr, note
