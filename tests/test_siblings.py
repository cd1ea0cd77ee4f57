"""Every module of the package has its own test file: src/frog/[pkg/]X.py is tested in tests/test_X.py
(the modules are found on disk with pkgutil, as in test_layers_order.py)."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import frog

TESTS = Path(__file__).parent
DEPRECATED_SHIMS = {"frog.layers", "frog.example_tangents"}  # old names that only re-export, with a warning
NOT_MODULES = {"__main__"}  # `python -m frog`: the command line's, tested in test_cli.py


def modules_needing_tests() -> list[str]:
    """Every module of frog but packages (their __init__), __main__ and the deprecated shims."""
    return [info.name for info in pkgutil.walk_packages(frog.__path__, "frog.")
            if not info.ispkg and info.name.rpartition(".")[2] not in NOT_MODULES and info.name not in DEPRECATED_SHIMS]


def sibling(module: str) -> str:
    """frog.training.lrs -> test_lrs.py."""
    return f"test_{module.rpartition('.')[2]}.py"


def missing_siblings(modules: list[str], tests: Path) -> list[str]:
    return [f"{module} (tests/{sibling(module)})" for module in modules if not (tests / sibling(module)).is_file()]


def test_every_module_has_a_sibling_test_file():
    modules = modules_needing_tests()
    assert "frog.training.lrs" in modules and "frog.forward_mode.patching" in modules  # subpackages are walked
    missing = missing_siblings(modules, TESTS)
    assert not missing, f"modules without their test file: {', '.join(missing)}"


def test_no_two_modules_share_a_test_file():
    """Two modules named alike in different subpackages would need another naming rule."""
    modules = modules_needing_tests()
    names = [sibling(module) for module in modules]
    assert sorted({name for name in names if names.count(name) > 1}) == []


def test_the_check_names_a_module_without_tests(tmp_path):
    (tmp_path / "test_present.py").write_text("")
    assert missing_siblings(["frog.present", "frog.sub.absent"], tmp_path) == ["frog.sub.absent (tests/test_absent.py)"]
    assert not {"frog.layers", "frog.example_tangents", "frog.__main__", "frog.training"} & set(modules_needing_tests())
