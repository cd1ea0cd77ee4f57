"""The scripts in examples/ run for a few steps and their loss falls (smoke tests of what users copy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from frog.data import DEFAULT_DIRS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GPL = Path("/usr/share/common-licenses/GPL-3")


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(records: list[dict]) -> tuple[float, float, list[float]]:
    """Held-out loss before and after training, and the step losses."""
    held_out = [r["test_loss"] for r in records if "test_loss" in r]
    return held_out[0], held_out[-1], [r["loss"] for r in records if "step" in r]


@pytest.mark.skipif(not Path(DEFAULT_DIRS["fashion-mnist"]).is_dir(), reason="needs Fashion-MNIST")
@pytest.mark.parametrize("perturbation", ["weight", "activity"])
def test_fashion_cnn(perturbation):
    records = example("fashion_cnn").main(["--steps", "6", "--batch-size", "32", "--train-size", "640",
                                           "--perturbation", perturbation])
    before, after, steps = losses(records)
    assert len(steps) == 6 and after < before - 0.01


@pytest.mark.skipif(not GPL.is_file(), reason="needs /usr/share/common-licenses/GPL-3 (Debian base-files)")
@pytest.mark.parametrize("perturbation", ["weight", "activity"])
def test_char_gpt(perturbation):
    records = example("char_gpt").main(["--steps", "6", "--batch-size", "8", "--context", "32",
                                        "--perturbation", perturbation])
    before, after, steps = losses(records)
    assert len(steps) == 6 and after < before - 0.01


def test_minimize():
    result = example("minimize").main(["--steps", "300", "--dim", "16"])
    assert result["frog"] < 0.5 * result["start"] and result["autograd"] < 0.5 * result["start"]
