"""The shared input checks: one rule for numbers, names and flags everywhere."""

from __future__ import annotations

import math

import pytest

from stem import _checks as checks
from stem.errors import ConfigurationError, ControlError, InvalidTaskOptionsError


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, "1", None, 0, -1])
def test_seconds_refuse_what_is_not_a_finite_positive_number(value):
    with pytest.raises(ConfigurationError, match="finite number of seconds > 0"):
        checks.seconds("lease", value)


def test_seconds_take_ints_and_floats_and_name_the_bound():
    assert checks.seconds("lease", 2) == 2.0 and checks.seconds("lease", 0, inclusive=True) == 0.0
    assert checks.optional_seconds("lease", None) is None
    with pytest.raises(InvalidTaskOptionsError, match=r"countdown must be .* >= 0, got -0.5"):
        checks.seconds("countdown", -0.5, inclusive=True, error=InvalidTaskOptionsError)


@pytest.mark.parametrize("value", [True, 1.0, "3", 0, 10])
def test_integers_are_ints_within_their_bounds(value):
    with pytest.raises(ControlError, match=r"n must be an integer 1\.\.9"):
        checks.integer("n", value, maximum=9, error=ControlError)
    assert checks.integer("n", 9, maximum=9) == 9


@pytest.mark.parametrize("name", ["", "a b", "x" * 129, "q\n", "é"])
def test_queue_names_follow_one_rule(name):
    with pytest.raises(ConfigurationError, match="bad queue name"):
        checks.queue_name(name)


@pytest.mark.parametrize("name", ["", "1abc", "bad name!", "a\n", "x" * 201])
def test_task_names_follow_one_rule(name):
    with pytest.raises(InvalidTaskOptionsError, match="bad task name"):
        checks.task_name(name, error=InvalidTaskOptionsError)
    assert checks.task_name("email.send:v2-x") == "email.send:v2-x"


def test_flags_are_bools_only():
    with pytest.raises(ConfigurationError, match="True or False"):
        checks.flag("yield_cpu", 1)


def test_ms_rounds_and_never_gives_zero():
    assert (checks.ms(0.0001), checks.ms(1.2346), checks.ms(30)) == (1, 1235, 30000)
