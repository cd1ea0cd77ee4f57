"""The frog command line end to end on tiny settings, and its one-line errors. (What frog approx and frog
optimize compute: test_approximation.py and test_optimization.py.)"""

from __future__ import annotations

import pytest

from frog.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimize", "--dims", "3", "-k", "16"], "no step size"),
        (["optimize", "-k", "0"], ">= 1"),
        (["optimize", "--dims", "0"], ">= 1"),
        (["optimize", "--function", "ackley"], "unknown function"),
        (["optimize", "--methods", "adam"], "unknown method"),
        (["optimize", "--sampler", "angle", "--angles", "0"], "(0, 90]"),
        (["approx", "--sampler", "angle", "--angles", "91"], "(0, 90]"),
        (["approx", "-k", "0"], ">= 1"),
        (["approx", "--dims", "0"], ">= 1"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frog: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["approx", "--dims", "2", "-k", "1", "--samples", "2", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write to the output folder" in err and "\n" not in err


def test_missing_step_size_names_the_combination(capsys, tmp_path):
    assert main(["optimize", "--function", "sphere", "--dims", "5", "-k", "2", "--methods", "frog",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "function=sphere" in err and "n=5" in err and "frog" in err and "--lr" in err
