"""Checkpoints that cannot run code when read: tensors and plain values only.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, so a checkpoint in a shared run
folder could run any code on resume. frog writes only tensors, dicts, lists, tuples, str, int, float,
bool and None (:func:`save` checks this) and reads with ``weights_only=True`` (:func:`load`), which
refuses anything else with a :class:`~frog.errors.CheckpointError` that says what to do. A file the
user trusts can be rewritten in the safe form once with :func:`convert`.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

PLAIN = (str, int, float, bool, type(None))  # exactly these types: e.g. numpy.float64, a float subclass, is not
CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """TypeError naming the first entry of ``value`` that is not a tensor or a plain value."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN:
        return
    if type(value) not in CONTAINERS:
        raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds tensors and plain values only")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) not in PLAIN:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: only str, int, float, bool, None")
            check_plain(item, f"{where}[{key!r}]")
    else:
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain values, checked first) to ``path`` atomically."""
    check_plain(payload)
    partial = Path(path).with_suffix(".tmp")
    torch.save(payload, partial)
    partial.replace(path)


def load(path: Path, map_location: torch.device | str | None = None) -> dict[str, Any]:
    """The payload at ``path``, read with ``weights_only=True``: nothing in the file can run code.

    Raises CheckpointError naming the file and the fix when it holds other objects or is damaged."""
    restart = f"start the run again without --resume (delete {path} or use another --out)"
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values (not written by this frog, or damaged); "
            f"frog does not unpickle them, since that could run code. Either {restart}, or, only if you trust "
            f"the file, convert it once: python -c \"from frog.training.checkpoints import convert; convert('{path}')\""
        ) from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); {restart}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a frog checkpoint; {restart}")
    return payload


def convert(path: str | Path) -> None:
    """Rewrite a checkpoint that the user trusts in the safe form: numpy arrays become tensors, numpy
    scalars Python numbers. Unpickles the file (it can run code: only for files you trust). TypeError
    for objects that have no plain form."""
    path = Path(path)
    save(path, _plain(torch.load(path, map_location="cpu", weights_only=False)))


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers, containers kept."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return type(value)((key, _plain(item)) for key, item in value.items())  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The global torch random states a run uses: CPU, and CUDA for a run on a CUDA device."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: Mapping[str, torch.Tensor | None], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    cpu = state["cpu"]
    assert cpu is not None  # rng_state always has the CPU's
    torch.set_rng_state(cpu.cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
