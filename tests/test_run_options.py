"""A run's options are one value, checked where it is made: each value out of range is one line naming it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantmap.executor import OptionsError, RunOptions
from quantmap.limits import MAX_TIMEOUT_S


@pytest.mark.parametrize("given_options, named", [
    (dict(timeout=timedelta(0)), "timeout"),
    (dict(timeout=timedelta(seconds=-5)), "timeout"),
    (dict(timeout=timedelta(seconds=MAX_TIMEOUT_S + 1)), "timeout"),
    (dict(timeout=600), "timeout"),  # seconds, not a timedelta
    (dict(shard_size=0), "shard_size"),
    (dict(shard_size=True), "shard_size"),
    (dict(shard_size=1.5), "shard_size"),
    (dict(nproc=0), "nproc"),
    (dict(nproc="2"), "nproc"),
    (dict(strict="yes"), "strict"),
    (dict(allow_partial=1), "allow_partial"),
    (dict(progress=None), "progress"),
    (dict(format="deployable"), "format"),
])
def test_an_option_out_of_range_is_refused_in_one_line_naming_it(given_options, named):
    with pytest.raises(OptionsError) as raised:
        RunOptions(**given_options)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"run option {named} must be ")
    assert repr(given_options[named]) in message  # what was given, as the caller wrote it


def test_the_defaults_are_the_command_lines():
    options = RunOptions()
    assert (options.strict, options.allow_partial, options.progress, options.nproc) == (False, False, False, None)
    assert options.timeout == timedelta(seconds=600) and options.shard_size == 5 * 2**30
    assert options.format == "quantizers"
    with pytest.raises(AttributeError):
        options.strict = True  # one value for the whole run: nothing changes it on the way


def test_strict_and_allow_partial_together_are_taken_as_today():
    """Under --strict the missing tensors are refused with the other findings, --allow-partial or not."""
    assert RunOptions(strict=True, allow_partial=True).strict


@given(st.integers(-10, MAX_TIMEOUT_S + 10))
def test_a_timeout_is_taken_exactly_when_it_is_above_zero_and_at_most_a_week(seconds):
    accepted = 0 < seconds <= MAX_TIMEOUT_S
    try:
        RunOptions(timeout=timedelta(seconds=seconds))
    except OptionsError:
        assert not accepted
    else:
        assert accepted
