"""Exceptions frog raises with a message that says what to change."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """The loss or a jvp became NaN or infinite (usually a learning rate that is too large)."""


class ForwardModeError(RuntimeError):
    """The function uses an operation that forward-mode AD (torch.func.jvp) cannot run."""


class CheckpointError(ValueError):
    """A checkpoint frog will not read: it holds more than tensors and plain values, or it is damaged."""
