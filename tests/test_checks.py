"""The shared argument checks (frog.checks): each accepts good values and raises a ValueError that names
the argument, what it must be and what it got."""

from __future__ import annotations

import math

import pytest

import frog
from frog.checks import check_choice, check_int, check_positive


@pytest.mark.parametrize(("value", "minimum"), [(0, None), (-3, None), (1, 1), (7, 1), (0, 0)])
def test_check_int_accepts_integers_at_or_above_the_minimum(value, minimum):
    check_int("k", value, minimum)


@pytest.mark.parametrize(("value", "minimum", "message"), [
    (0, 1, "k must be an integer >= 1, got 0"),
    (-1, 0, "k must be an integer >= 0, got -1"),
    (True, 1, "k must be an integer >= 1, got True"),  # a bool is not a count
    (2.0, 1, "k must be an integer >= 1, got 2.0"),
    ("3", None, "k must be an integer, got '3'"),
    (None, 1, "k must be an integer >= 1, got None"),
])
def test_check_int_rejects_and_names_the_argument(value, minimum, message):
    with pytest.raises(ValueError) as caught:
        check_int("k", value, minimum)
    assert str(caught.value) == message


def test_check_int_optional_takes_none_only_when_asked():
    check_int("max_streams", None, 1, optional=True)
    check_int("max_streams", 2, 1, optional=True)
    with pytest.raises(ValueError) as caught:
        check_int("max_streams", 0, 1, optional=True)
    assert str(caught.value) == "max_streams must be an integer >= 1 or None, got 0"


@pytest.mark.parametrize("value", [1, 0.5, 1e-300, 3.0e10])
def test_check_positive_accepts_finite_positive_numbers(value):
    check_positive("lr", value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.inf, math.nan, True, "1", None])
def test_check_positive_rejects_and_names_the_argument(value):
    with pytest.raises(ValueError) as caught:
        check_positive("lr", value)
    assert str(caught.value) == f"lr must be a finite number > 0, got {value!r}"


def test_check_choice():
    check_choice("engine", "sim", ("jvp", "sim"))
    with pytest.raises(ValueError) as caught:
        check_choice("engine", "magic", ("jvp", "sim"))
    assert str(caught.value) == "unknown engine 'magic'; choose one of jvp, sim"
    with pytest.raises(ValueError, match="unknown engine None"):
        check_choice("engine", None, ("jvp", "sim"))


def test_the_estimators_use_them():
    with pytest.raises(ValueError, match=r"^num_tangents must be an integer >= 1, got 0$"):
        frog.ForwardGradient(0)
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0, got -0.1$"):
        frog.MeZO(eps=-0.1)
    with pytest.raises(ValueError, match=r"^unknown engine 'magic'; choose one of "):
        frog.ForwardGradient(2, engine="magic")
