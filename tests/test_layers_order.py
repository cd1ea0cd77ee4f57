"""The package's layers (docs/architecture.md): a module imports only from its own layer and the ones below.

LAYERS is the one place that says which layer each module belongs to, lowest first. Every module of
the package must appear in it exactly once, so a new module has to be placed. Every import counts,
also one inside a function (a lazy import) or under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import frog

LAYERS: dict[str, list[str]] = {  # lowest first
    # rules that let stock PyTorch layers run under torch.func.jvp; they know nothing of tangents
    "forward_mode": [
        "frog.forward_mode",
        "frog.forward_mode.patching",
        "frog.forward_mode.attention",
        "frog.forward_mode.batchnorm",
        "frog.forward_mode.plain_kernels",
        "frog.forward_mode.masks",
    ],
    # the estimator: tangents, aggregation, engines (which enter the forward-mode rules), ForwardGradient
    "core": [
        "frog.errors",
        "frog.checks",
        "frog.layouts",
        "frog.tangents",
        "frog.aggregation",
        "frog.factored",
        "frog.layers",
        "frog.engines",
        "frog.activity",
        "frog.guesses",
        "frog.per_example",
        "frog.example_tangents",
        "frog.distributed",
        "frog.interface",
        "frog.solver",
        "frog.weight_perturbation",
        "frog.activity_perturbation",
        "frog.estimator",
        "frog.mezo",
        "frog.local",
        "frog.quality",
    ],
    # applications of the estimator: test problems, networks, data, training loop, tables, files, plots
    "training": [
        "frog.training",
        "frog.training.functions",
        "frog.training.data",
        "frog.training.models",
        "frog.training.methods",
        "frog.training.strategies",
        "frog.training.lrs",
        "frog.training.results",
        "frog.training.checkpoints",
        "frog.training.optimize",
        "frog.training.train",
        "frog.training.plots",
    ],
    # the paper's experiments, their reproduction and the learning-rate search that runs them
    "experiments": [
        "frog.experiments",
        "frog.experiments.approximation",
        "frog.experiments.optimization",
        "frog.experiments.networks",
        "frog.experiments.report",
        "frog.experiments.reproduce",
        "frog.experiments.tune",
    ],
    # the command line, and the package's public names (frog/__init__.py re-exports from lower layers)
    "cli": ["frog", "frog.cli", "frog.__main__"],
}

LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
RANK = {layer: i for i, layer in enumerate(LAYERS)}
NOT_IMPORTED = {"frog.__main__"}  # importing it runs the command line


def package_modules() -> list[str]:
    """Every module and subpackage of frog, found on disk (pkgutil), the package itself included."""
    return ["frog", *(info.name for info in pkgutil.walk_packages(frog.__path__, "frog."))]


def source_of(name: str) -> tuple[Path, bool]:
    """(file, whether it is a package's __init__) of the module ``name``."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"cannot find the source of {name}"
    return Path(spec.origin), spec.submodule_search_locations is not None


def imported_modules(name: str) -> list[tuple[str, int]]:
    """(frog module, line) for every import of a frog module in the module ``name``."""
    path, is_package = source_of(name)
    return imports_in(path.read_text(), name, is_package)


def imports_in(source: str, name: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(frog module, line) for every import of a frog module in ``source`` (the code of module
    ``name``), relative ones resolved; ``from package import name`` counts as the submodule where
    ``name`` is one."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level - 1 < len(parts), f"{name}:{node.lineno}: relative import beyond the package"
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in LAYER_OF else source, node.lineno))
    found = list(dict.fromkeys(found))  # `from .x import a, b` once
    return [(module, line) for module, line in found if module == "frog" or module.startswith("frog.")]


def test_every_module_has_a_layer():
    modules = package_modules()
    missing = [m for m in modules if m not in LAYER_OF]
    assert not missing, f"modules without a layer: {missing}; add each to LAYERS in {Path(__file__).name}"
    stale = sorted(set(LAYER_OF) - set(modules))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    listed = [m for ms in LAYERS.values() for m in ms]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"modules in more than one place in LAYERS: {twice}"


def test_every_module_imports():
    for name in package_modules():
        if name not in NOT_IMPORTED:
            importlib.import_module(name)


def violations(name: str, imports: list[tuple[str, int]]) -> list[str]:
    """What is wrong with the module ``name`` (in LAYERS) importing ``imports`` ((module, line) pairs)."""
    layer, errors = LAYER_OF[name], []
    for target, line in imports:
        target_layer = LAYER_OF.get(target)
        if target_layer is None:
            errors.append(f"{name} (line {line}) imports {target}, which is not a module in LAYERS")
        elif RANK[target_layer] > RANK[layer]:
            errors.append(f"{name} (layer {layer}, line {line}) imports {target} (layer {target_layer}, "
                          "higher): a layer may import only from itself and the layers below it")
    return errors


def test_no_layer_imports_a_higher_one():
    errors = []
    for name in package_modules():
        if name in LAYER_OF:  # else test_every_module_has_a_layer names it
            errors += violations(name, imported_modules(name))
    assert not errors, "\n".join(errors)


def test_the_check_finds_an_upward_import():
    """A lazy, relative import of a higher layer is found and named, with its line."""
    source = "import torch\n\ndef f():\n    from ..experiments import tune\n    from .. import tangents\n"
    imports = imports_in(source, "frog.training.train")
    assert imports == [("frog.experiments.tune", 4), ("frog.tangents", 5)]
    (error,) = violations("frog.training.train", imports)
    assert "frog.training.train (layer training, line 4) imports frog.experiments.tune (layer experiments" in error
    assert violations("frog.cli", imports) == []


def test_the_check_sees_relative_and_lazy_imports():
    """On the package itself: ``from .. import``, ``from . import module`` and imports in functions."""
    found = dict(imported_modules("frog.experiments.tune"))
    assert "frog.experiments.optimization" in found  # `from .optimization import ...` inside a function
    assert "frog.training.train" in found  # `from ..training.train import TrainConfig`
    assert "frog.tangents" in found
    assert dict(imported_modules("frog.cli")).keys() >= {"frog.experiments.tune", "frog.training.train"}
    assert "frog.training.checkpoints" in dict(imported_modules("frog.training.train"))  # `from . import checkpoints`
