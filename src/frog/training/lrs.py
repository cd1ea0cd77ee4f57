"""Step-size tables: the paper's, shipped as package data (``frog/training/lrs/*.csv``), and tuned ones
(``frog tune`` writes ``lrs.csv`` in the same format; ``--lr-table PATH`` reads it)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

TABLES = ("math", "math__custom_tangents", "fc_nns", "sota_nns", "tuned")  # tuned: frog's own, for its estimators


@cache
def load_table(name: str) -> tuple[dict[str, str], ...]:
    """Rows of the table ``name`` (one of TABLES) as dicts of strings."""
    if name not in TABLES:
        raise ValueError(f"unknown learning-rate table {name!r}; choose one of {', '.join(TABLES)}")
    table = resources.files("frog.training").joinpath("lrs").joinpath(f"{name}.csv")  # one name a call (3.10)
    with table.open(newline="") as handle:  # type: ignore[call-overload]  # Traversable's stub lacks newline
        return tuple(csv.DictReader(handle))


def _k_of(text: str) -> int | None:
    return int(float(text)) if text else None


def _find(rows: Sequence[dict[str, str]], where: str, hint: str, **key: object) -> float:
    """The ``lr`` of the first row whose columns equal ``key`` (``k`` as an integer, None for bp;
    the rest as text, None as empty); ValueError naming the missing combination otherwise."""
    for row in rows:
        if all(_k_of(row[c]) == v if c == "k" else row[c] == ("" if v is None else str(v)) for c, v in key.items()):
            return float(row["lr"])
    described = ", ".join(f"{c}={v}" for c, v in key.items() if v is not None or c == "k")
    raise ValueError(f"{where} has no step size for {described}; {hint}")


def lookup(table: str, **key: object) -> float:
    """The ``lr`` of the row of the paper's ``table`` whose columns equal ``key``.

    ``k`` is compared as an integer (None for bp); other values as strings. Raises ValueError
    naming the missing combination.
    """
    return _find(load_table(table), f"the paper's table {table}.csv", "give one with --lr", **key)


def table_lr(path: str | Path, strategy: str = "sgd", **key: object) -> float:
    """The ``lr`` for ``key`` in the CSV table at ``path`` (``--lr-table``), e.g. a tune's ``lrs.csv``.

    Every column of ``key`` must be in the table. A ``strategy`` column, when the table has one,
    must equal ``strategy``; a table without it holds SGD step sizes (as the paper's tables).
    """
    try:
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), reader.fieldnames or []
    except OSError as error:
        raise ValueError(f"cannot read the learning-rate table {path}: {error.strerror or error}") from None
    required = ["lr", *(c for c, v in key.items() if v is not None or c == "k")]  # angle None: optional
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path} is not a learning-rate table for this command: it lacks the column(s) "
                         f"{', '.join(missing)} (its columns: {', '.join(header) or 'none'})")
    if "strategy" in header:
        key = {**key, "strategy": strategy}
    elif strategy != "sgd":
        raise ValueError(f"{path} has no strategy column: its step sizes are for sgd, not --optimizer {strategy}")
    key = {c: v for c, v in key.items() if c in header}
    return _find(rows, str(path), "tune it with `frog tune` or give --lr", **key)


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
    row_model = model_row_name(model, width)
    if model == "fc":
        table = "fc_nns"
    elif model in ("resnet18", "vit"):
        table = "sota_nns"
    else:
        raise ValueError(f"the paper has no step size for model {model!r}; give one with --lr")
    lr = lookup(table, model=row_model, dataset=table_dataset, gradient_approach=method, k=k)
    note = f"paper's {table}.csv, {row_model}, {table_dataset}, {method}" + (f", k={k}" if k else "")
    if table_dataset != dataset:
        note += f" (the paper has no {dataset} row: using its MNIST row)"
    return lr, note


def variant_lr(model: str, width: int, dataset: str, method: str, k: int | None, variant: str) -> tuple[float, str]:
    """Step size of an estimator the paper has no row for (``variant``: ``guess``, ``per-example`` or
    ``guess+per-example``, docs/guides/closing-the-gap.md): frog's own table ``tuned.csv`` (its ``source``
    column holds the tune's command; ``guess+per-example`` falls back to the ``guess`` row), else
    backprop's paper step size with guesses (they give estimates of about the gradient's length) or the
    paper's own row."""
    row_model = model_row_name(model, width)
    for row_variant in dict.fromkeys([variant, "guess" if "guess" in variant else variant]):
        try:
            lr = _find(load_table("tuned"), "tuned.csv", "", model=row_model, dataset=dataset,
                       gradient_approach=method, k=k, variant=row_variant)
            return lr, f"frog's tuned.csv, {row_model}, {dataset}, {method}, k={k}, {row_variant} (frog tune train)"
        except ValueError:
            pass
    if "guess" in variant:
        lr, note = network_lr(model, width, dataset, "bp", k)
        return lr, f"{note} (backprop's: with guesses the estimates have about the gradient's length; tune it)"
    lr, note = network_lr(model, width, dataset, method, k)
    return lr, f"{note} (tuned for shared tangents; tune it)"


def model_row_name(model: str, width: int) -> str:
    """The ``model`` column of the network tables: ``fc_w=<width>`` for fc, else the model's name."""
    return f"fc_w={width}" if model == "fc" else model
