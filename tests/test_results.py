"""Result files: CSV rows written as they come, and files of an older frog still resume."""

from __future__ import annotations

import pytest

from frog.training.results import CsvLog, read_csv


def test_rows_are_kept_and_a_rerun_skips_them(tmp_path):
    log = CsvLog(tmp_path / "a.csv", ["k", "value"])
    log.append({"k": 1, "value": 0.5})
    again = CsvLog(tmp_path / "a.csv", ["k", "value"])
    assert again.done(["k"]) == {("1",)}
    assert read_csv(tmp_path / "a.csv") == (["k", "value"], [{"k": "1", "value": "0.5"}])


def test_a_file_from_before_new_columns_gets_them(tmp_path):
    (tmp_path / "m.csv").write_text("epoch,loss\n1,0.7\n2,0.6\n")
    log = CsvLog(tmp_path / "m.csv", ["epoch", "loss", "optimizer", "extra"], {"optimizer": "sgd"})
    log.append({"epoch": 3, "loss": 0.5, "optimizer": "adam", "extra": 2})
    header, rows = read_csv(tmp_path / "m.csv")
    assert header == ["epoch", "loss", "optimizer", "extra"]
    assert [tuple(r.values()) for r in rows] == [("1", "0.7", "sgd", ""), ("2", "0.6", "sgd", ""),
                                                 ("3", "0.5", "adam", "2")]
    assert log.done(["epoch", "optimizer"]) == {("1", "sgd"), ("2", "sgd"), ("3", "adam")}


def test_other_columns_are_an_error_that_names_the_file(tmp_path):
    (tmp_path / "m.csv").write_text("epoch,accuracy\n1,0.7\n")
    with pytest.raises(ValueError, match="m.csv has columns"):
        CsvLog(tmp_path / "m.csv", ["epoch", "loss"])
