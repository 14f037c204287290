"""Deadlines and time budgets.

A :class:`Deadline` is an absolute point on the event loop's monotonic clock. The one in
force is carried in a context variable, so code deep in the call path (an upstream
call, a retry sleep) can ask how much time is left without it being threaded through
every signature. With no deadline in force there is no budget: ``remaining()`` is
``None``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ballast.errors import BudgetExceeded

#: Timers do not fire on ``time.monotonic()`` exactly: uvloop's (libuv's) clock is cached
#: once per loop iteration in whole milliseconds, so a timeout set to end at a deadline
#: can fire up to a millisecond before ``time.monotonic()`` reaches it. Whether a failure
#: came *from* the deadline is decided with this much slack.
TIMER_SLACK_S = 0.005


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute deadline in ``time.monotonic()`` seconds, with its total budget."""

    at: float
    budget_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def spent(self) -> bool:
        """Expired, or within a timer's granularity of it (:data:`TIMER_SLACK_S`): a
        failure now (an attempt timed out, no time left to retry) is the budget's doing."""
        return self.remaining() <= TIMER_SLACK_S

    def check(self, what: str = "operation") -> None:
        """Raise :class:`BudgetExceeded` if the deadline has passed."""
        if self.expired():
            raise BudgetExceeded(internal=f"time budget of {self.budget_s:.3f}s exhausted before {what}")


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "ballast_deadline", default=None
)


def remaining() -> float | None:
    """Seconds left in the current budget (may be <= 0), or ``None`` when unbounded."""
    d = _current.get()
    return None if d is None else d.remaining()


class deadline_scope:
    """``with deadline_scope(d) as effective:`` put ``d`` in force for the block; an
    outer, earlier deadline still wins (``effective`` is the one in force).

    A class rather than a generator-based context manager: every request enters one,
    and the generator's creation and stepping cost more than the scope's work.
    """

    __slots__ = ("_deadline", "_token")

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline
        self._token: contextvars.Token[Deadline | None] | None = None

    def __enter__(self) -> Deadline:
        outer = _current.get()
        deadline = self._deadline
        effective = deadline if outer is None or deadline.at < outer.at else outer
        self._token = _current.set(effective)
        return effective

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


@contextmanager
def unbounded() -> Iterator[None]:
    """Lift any deadline for the block.

    For background work started inside a request (a finalize job): a task copies the
    context it is created in, and must not inherit the request's deadline.
    """
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


def bounded(timeout_s: float | None) -> float | None:
    """The smaller of ``timeout_s`` and the time left; ``None`` if both are unbounded."""
    left = remaining()
    if left is None:
        return timeout_s
    left = max(left, 0.0)
    return left if timeout_s is None else min(timeout_s, left)
