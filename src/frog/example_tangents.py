"""Deprecated name of :mod:`frog.per_example` (per-example activity tangents, not example code)."""

import warnings

from .per_example import *
from .per_example import EXAMPLE_KINDS, Guesses, MaskCheck, check_example_kind, checked_guesses, example_plan

warnings.warn("frog.example_tangents is deprecated: import frog.per_example", DeprecationWarning, stacklevel=2)

__all__ = ["EXAMPLE_KINDS", "Guesses", "MaskCheck", "check_example_kind", "checked_guesses", "example_plan"]
