"""Deadlines and time budgets.

A :class:`Deadline` is an absolute point on the event loop's monotonic clock. Code deep
in the call path (an upstream call, a retry sleep) asks how much time is left with
:func:`remaining` instead of having it threaded through every signature. With no
deadline in force there is no budget: ``remaining()`` is ``None``.

A deadline is in force in one of two ways:

* a *scope*, :class:`deadline_scope`, carried in a context variable: a finalize job's
  budget, or any block that wants one; it is inherited by tasks started inside it;
* a *task deadline*: the request budget registers the request's task and its deadline
  in a :class:`TaskDeadlines` table (its watchdog's) instead of entering a scope. A
  scope per request (a context variable set and reset around the handler) measured as
  twice the garbage collector's young-generation runs on a simple read, and about a
  tenth of its CPU (bench/README.md, section 1); the table is consulted only when
  something asks for the time left.

Where both apply, the earlier deadline wins; :func:`unbounded` lifts both for its block.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

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


class _Scope(enum.Enum):
    NONE = "none"  # no scope entered: the task's deadline, if any, applies


_NO_SCOPE = _Scope.NONE
#: The scope in force: a Deadline, None (lifted by :func:`unbounded`) or no scope at all.
_current: contextvars.ContextVar[Deadline | _Scope | None] = contextvars.ContextVar(
    "ballast_deadline", default=_NO_SCOPE
)


class TaskDeadlines(Protocol):
    """A table of tasks with deadlines (the request budget's watchdog is one)."""

    def deadline_of(self, task: asyncio.Task[object]) -> Deadline | None: ...


_tables: weakref.WeakSet[TaskDeadlines] = weakref.WeakSet()


def register_task_deadlines(table: TaskDeadlines) -> None:
    """Have :func:`current` consult ``table`` for the running task (held weakly)."""
    _tables.add(table)


def _task_deadline() -> Deadline | None:
    if not _tables:
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
    if task is None:
        return None
    for table in list(_tables):
        found = table.deadline_of(task)
        if found is not None:
            return found
    return None


def current() -> Deadline | None:
    """The deadline in force: the earlier of the scope's and the running task's."""
    scoped = _current.get()
    if scoped is None:
        return None  # lifted
    task = _task_deadline()
    if scoped is _NO_SCOPE:
        return task
    assert isinstance(scoped, Deadline)
    return scoped if task is None or scoped.at <= task.at else task


def scoped() -> Deadline | None:
    """The deadline of the scope in force, if any (not the task's)."""
    d = _current.get()
    return d if isinstance(d, Deadline) else None


def remaining() -> float | None:
    """Seconds left in the current budget (may be <= 0), or ``None`` when unbounded."""
    d = current()
    return None if d is None else d.remaining()


class deadline_scope:
    """``with deadline_scope(d) as effective:`` put ``d`` in force for the block; an
    outer, earlier deadline still wins (``effective`` is the one in force).

    A class rather than a generator-based context manager: the generator's creation and
    stepping cost more than the scope's work.
    """

    __slots__ = ("_deadline", "_token")

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline
        self._token: contextvars.Token[Deadline | _Scope | None] | None = None

    def __enter__(self) -> Deadline:
        outer = current()
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
