"""Step-size tables (frog.training.lrs): every lookup against the shipped CSV files read here with the csv
module, the fallbacks of the network and variant step sizes, and ``--lr-table`` files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import frog.training
from frog.training.lrs import (
    TABLES,
    load_table,
    lookup,
    math_lr,
    model_row_name,
    network_lr,
    table_lr,
    variant_lr,
)

LRS = Path(frog.training.__file__).parent / "lrs"


def shipped(name: str) -> list[dict[str, str]]:
    with (LRS / f"{name}.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def first_lr(rows, **key) -> float:
    """The lr of the first row matching ``key``, k compared as a number (empty for bp)."""
    for row in rows:
        if all((float(row[c]) if row[c] else None) == v if c == "k" else row[c] == str(v) for c, v in key.items()):
            return float(row["lr"])
    raise LookupError(key)


def test_tables_are_the_shipped_files():
    assert sorted(TABLES) == sorted(path.stem for path in LRS.glob("*.csv"))
    for name in TABLES:
        assert list(load_table(name)) == shipped(name)
    with pytest.raises(ValueError, match="unknown learning-rate table 'adam'; choose one of math, "):
        load_table("adam")


@pytest.mark.parametrize("table", ["fc_nns", "sota_nns", "math"])
def test_every_row_of_a_paper_table_is_found(table):
    rows = shipped(table)
    key_columns = [c for c in rows[0] if c not in ("lr", "optimizer")]
    for row in rows:
        key = {c: (int(float(row[c])) if row[c] else None) if c == "k" else row[c] for c in key_columns}
        assert lookup(table, **key) == first_lr(rows, **key)
    with pytest.raises(ValueError, match=r"the paper's table fc_nns.csv has no step size for model=fc_w=7, .*--lr"):
        lookup("fc_nns", model="fc_w=7", dataset="mnist", gradient_approach="bp", k=None)


def test_math_lr_with_and_without_angle():
    math = shipped("math")
    assert math_lr("sphere", 16, "frog", 4) == first_lr(math, function="sphere", n=16, gradient_approach="frog", k=4)
    # bp has no k: a k given for it is ignored
    assert math_lr("sphere", 16, "bp", 4) == first_lr(math, function="sphere", n=16, gradient_approach="bp", k=None)
    custom = shipped("math__custom_tangents")
    mean = first_lr(custom, function="styblinski-tang", n=64, gradient_approach="fg-mean", k=16,
                    optimizer="FG(k=16,agg=mean,normalize=False,sampler=specific_angle_15)")
    assert math_lr("styblinski-tang", 64, "fg-mean", 16, 15.0) == mean
    frog_row = first_lr(custom, function="styblinski-tang", n=64, gradient_approach="frog", k=16,
                        optimizer="FG(k=16,agg=orthogonal_projection,normalize=False,sampler=normal)")
    for angle in (15.0, 30.0):  # frog's span does not depend on the angle: one row
        assert math_lr("styblinski-tang", 64, "frog", 16, angle) == frog_row


def test_network_lr_uses_the_mnist_row_for_other_datasets_and_says_so():
    fc = shipped("fc_nns")
    lr, note = network_lr("fc", 256, "mnist", "fg-mean", 4)
    assert lr == first_lr(fc, model="fc_w=256", dataset="mnist", gradient_approach="fg-mean", k=4)
    assert note == "paper's fc_nns.csv, fc_w=256, mnist, fg-mean, k=4"
    lr, note = network_lr("fc", 256, "digits", "bp", 16)
    assert lr == first_lr(fc, model="fc_w=256", dataset="mnist", gradient_approach="bp", k=None)
    assert note == "paper's fc_nns.csv, fc_w=256, mnist, bp (the paper has no digits row: using its MNIST row)"
    sota = shipped("sota_nns")
    assert network_lr("resnet18", 0, "cifar10", "bp", None)[0] == first_lr(
        sota, model="resnet18", dataset="cifar10", gradient_approach="bp", k=None)
    with pytest.raises(ValueError, match="the paper has no step size for model 'conv'; give one with --lr"):
        network_lr("conv", 256, "mnist", "bp", None)


def test_variant_lr_prefers_frogs_tuned_rows_then_falls_back():
    tuned = shipped("tuned")
    guess = first_lr(tuned, model="fc_w=1024", dataset="fashion-mnist", gradient_approach="frog", k=16,
                     variant="guess")
    lr, note = variant_lr("fc", 1024, "fashion-mnist", "frog", 16, "guess")
    assert lr == guess and note.startswith("frog's tuned.csv") and note.endswith("guess (frog tune train)")
    assert variant_lr("fc", 1024, "fashion-mnist", "frog", 16, "guess+per-example")[0] == guess  # the guess row
    per_example = first_lr(tuned, model="fc_w=1024", dataset="fashion-mnist", gradient_approach="frog", k=16,
                           variant="per-example")
    assert variant_lr("fc", 1024, "fashion-mnist", "frog", 16, "per-example")[0] == per_example
    # no tuned row: with guesses backprop's step size, else the paper's own row
    lr, note = variant_lr("fc", 256, "mnist", "frog", 4, "guess")
    assert lr == network_lr("fc", 256, "mnist", "bp", 4)[0] and "backprop's" in note
    lr, note = variant_lr("fc", 256, "mnist", "frog", 4, "per-example")
    assert lr == network_lr("fc", 256, "mnist", "frog", 4)[0] and note.endswith("(tuned for shared tangents; tune it)")


def write_table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_table_lr_reads_a_tune_table(tmp_path):
    table = write_table(tmp_path / "lrs.csv", ["function", "n", "gradient_approach", "k", "lr"],
                        [["sphere", 8, "bp", "", 0.5], ["sphere", 8, "frog", 2, 0.25], ["sphere", 8, "frog", "4.0", 0.125]])
    assert table_lr(table, function="sphere", n=8, gradient_approach="bp", k=None) == 0.5
    assert table_lr(table, function="sphere", n=8, gradient_approach="frog", k=4) == 0.125
    assert table_lr(table, function="sphere", n=8, gradient_approach="frog", k=2, angle=None) == 0.25  # no angle column
    with pytest.raises(ValueError, match=r"has no step size for function=sphere, n=8, gradient_approach=frog, k=3; tune"):
        table_lr(table, function="sphere", n=8, gradient_approach="frog", k=3)
    with pytest.raises(ValueError, match="it lacks the column\\(s\\) angle"):
        table_lr(table, function="sphere", n=8, gradient_approach="frog", k=2, angle=15.0)
    with pytest.raises(ValueError, match="its step sizes are for sgd, not --optimizer adam"):
        table_lr(table, "adam", function="sphere", n=8, gradient_approach="frog", k=2)
    with pytest.raises(ValueError, match="cannot read the learning-rate table"):
        table_lr(tmp_path / "missing.csv", function="sphere")


def test_table_lr_with_a_strategy_column_matches_it(tmp_path):
    table = write_table(tmp_path / "lrs.csv", ["function", "n", "gradient_approach", "k", "strategy", "lr"],
                        [["sphere", 8, "frog", 2, "sgd", 0.5], ["sphere", 8, "frog", 2, "adam", 0.01]])
    key = {"function": "sphere", "n": 8, "gradient_approach": "frog", "k": 2}
    assert table_lr(table, **key) == 0.5
    assert table_lr(table, "adam", **key) == 0.01
    with pytest.raises(ValueError, match="strategy=normalized"):
        table_lr(table, "normalized", **key)


def test_model_row_name():
    assert model_row_name("fc", 1024) == "fc_w=1024"
    assert model_row_name("vit", 1024) == "vit"
