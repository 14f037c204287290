"""Deadlines: what counts as the budget having run out."""

from __future__ import annotations

import time

from ballast.budget import TIMER_SLACK_S, Deadline


def test_a_deadline_within_a_timers_granularity_is_spent_but_not_expired() -> None:
    # uvloop's timers run on a millisecond clock and can fire just before the deadline:
    # a failure then is still the budget's doing.
    almost = Deadline(time.monotonic() + TIMER_SLACK_S / 2, 1.0)
    assert not almost.expired() and almost.spent()


def test_a_deadline_well_ahead_is_neither() -> None:
    ahead = Deadline.after(60)
    assert not ahead.expired() and not ahead.spent()


def test_a_passed_deadline_is_both() -> None:
    passed = Deadline(time.monotonic() - 1, 1.0)
    assert passed.expired() and passed.spent()
