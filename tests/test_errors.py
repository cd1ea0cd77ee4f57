"""frog's exceptions (frog.errors): each subclasses what its callers already catch (a CheckpointError is a
ValueError, so the command line reports it in one line; a ForwardModeError a RuntimeError; a
NonFiniteError a FloatingPointError), and each is raised where its docstring says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import frog
from frog.errors import CheckpointError, ForwardModeError, NonFiniteError
from frog.training import checkpoints


def test_the_classes_subclass_what_callers_catch():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(ForwardModeError, RuntimeError) and not issubclass(ForwardModeError, ValueError)
    assert issubclass(NonFiniteError, FloatingPointError) and issubclass(NonFiniteError, ArithmeticError)
    assert not issubclass(NonFiniteError, (ValueError, RuntimeError))
    assert (frog.CheckpointError, frog.ForwardModeError, frog.NonFiniteError) == (
        CheckpointError, ForwardModeError, NonFiniteError)  # the public names are these classes


def test_a_diverged_function_raises_non_finite_error():
    """The loss became infinite: the error names the call and says to lower the learning rate."""
    with pytest.raises(FloatingPointError) as caught:
        frog.ForwardGradient(2).grad(lambda x: (x * float("inf")).sum(), torch.ones(3, dtype=torch.float64))
    assert type(caught.value) is NonFiniteError
    assert "step 0" in str(caught.value) and "smaller learning rate" in str(caught.value)


def test_an_operation_without_forward_rule_raises_forward_mode_error():
    """torch's pdist has no forward-mode rule: caught as a RuntimeError, the error names the engines that work."""
    with pytest.raises(RuntimeError) as caught:
        frog.ForwardGradient(2, engine="jvp").grad(lambda x: F.pdist(x.reshape(3, 2)).sum(),
                                                   torch.randn(6, dtype=torch.float64))
    assert type(caught.value) is ForwardModeError
    assert "engine='sim'" in str(caught.value)


def test_a_damaged_checkpoint_raises_checkpoint_error(tmp_path):
    """Caught as a ValueError (the command line's one-line error, exit 2: tests/test_checkpoints.py)."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as caught:
        checkpoints.load(path)
    assert type(caught.value) is CheckpointError and str(path) in str(caught.value)
