"""Routing a function for the length of a context (frog.forward_mode.patching.patched)."""

from __future__ import annotations

import types

import pytest

from frog.forward_mode.patching import patched


def module_with_function() -> types.ModuleType:
    module = types.ModuleType("library")
    module.function = lambda: "original"
    return module


def test_callers_that_look_the_function_up_are_routed_and_restored():
    library = module_with_function()
    original = library.function
    imported_before = library.function  # `from library import function` before the context

    def caller():
        return library.function()  # looked up on the module at call time, as PyTorch's modules do

    with patched(library, "function", lambda: "replacement"):
        assert caller() == "replacement"
        assert imported_before() == "original"
    assert caller() == "original" and library.function is original


def test_nested_contexts_restore_in_order():
    library = module_with_function()
    original = library.function
    with patched(library, "function", lambda: "outer"):
        with patched(library, "function", lambda: "inner"):
            assert library.function() == "inner"
        assert library.function() == "outer"
    assert library.function is original


def test_an_exception_inside_restores_and_propagates():
    library = module_with_function()
    original = library.function
    with pytest.raises(KeyError), patched(library, "function", lambda: "replacement"):
        raise KeyError("inside")
    assert library.function is original


def test_an_inherited_attribute_is_removed_again():
    class Base:
        def name(self):
            return "base"

    class Child(Base):
        pass

    with patched(Child, "name", lambda self: "child"):
        assert Child().name() == "child" and "name" in vars(Child)
        assert Base().name() == "base"
    assert "name" not in vars(Child)  # not left as a copy of Base's
    assert Child().name() == "base"


def test_a_new_attribute_is_removed_again():
    library = module_with_function()
    with patched(library, "added", 3):
        assert library.added == 3
    assert not hasattr(library, "added")
