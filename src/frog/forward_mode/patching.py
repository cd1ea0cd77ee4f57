"""Routing a library function to frog's own for the length of a context: the one mechanism behind
frog's forward-mode rules (:mod:`.attention`, :mod:`.batchnorm`, :mod:`.plain_kernels`) and its
same-masks passes (:mod:`.masks`), all in :mod:`frog.forward_mode`.

Code that looks the function up on its module at call time (``F.batch_norm(...)``, as PyTorch's own
modules do) is routed; a name imported before keeps the original. Not thread-safe: it patches modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name = replacement`` within the context; afterwards as it was (an attribute the owner only
    inherited is removed again), also when contexts nest."""
    had, before = name in vars(owner), vars(owner).get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, before)
        else:
            delattr(owner, name)
