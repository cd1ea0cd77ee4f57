"""The scripts in examples/ run for a few steps and their loss falls (smoke tests of what users copy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from frog.training.data import DEFAULT_DIRS

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


HAVE_FASHION = Path(DEFAULT_DIRS["fashion-mnist"]).is_dir()
TRAINING = {  # example, arguments (a few small steps), what it needs
    "cnn-weight-jvp": ("fashion_cnn", ["--steps", "6", "--batch-size", "32", "--train-size", "640"], HAVE_FASHION),
    "cnn-activity-sim": ("fashion_cnn", ["--steps", "20", "--train-size", "1280", "--perturbation", "activity",
                                         "--engine", "sim"], HAVE_FASHION),
    "gpt-weight-jvp": ("char_gpt", ["--steps", "6", "--batch-size", "8", "--context", "32", "--perturbation",
                                    "weight"], GPL.is_file()),
    "gpt-activity-jvp": ("char_gpt", ["--steps", "6", "--batch-size", "8", "--context", "32"], GPL.is_file()),
    "gpt-local": ("char_gpt", ["--steps", "6", "--batch-size", "8", "--context", "32", "--gradient", "local"],
                  GPL.is_file()),
    "gpt-topdown1-sim": ("char_gpt", ["--steps", "6", "--batch-size", "8", "--context", "32", "--guess", "topdown1",
                                      "--engine", "sim"], GPL.is_file()),
}


@pytest.mark.parametrize("case", list(TRAINING))
def test_training_example_learns(case):
    name, argv, available = TRAINING[case]
    if not available:
        pytest.skip("needs Fashion-MNIST (dataset-fashion-mnist) or /usr/share/common-licenses/GPL-3")
    records = example(name).main(argv)
    before, after, steps = losses(records)
    assert len(steps) == int(argv[1]) and after < before - 0.01


def test_minimize():
    result = example("minimize").main(["--steps", "300", "--dim", "16"])
    assert result["frog"] < 0.5 * result["start"] and result["autograd"] < 0.5 * result["start"]
