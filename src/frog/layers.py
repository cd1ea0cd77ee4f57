"""Deprecated name of :mod:`frog.factored` (factored weight tangents through known layers)."""

import warnings

from .factored import *

warnings.warn("frog.layers is deprecated: import frog.factored", DeprecationWarning, stacklevel=2)
