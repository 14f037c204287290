"""The contract of a background job that plugins wrap: its context and the stage wrapper.

A job (today: a session's finalize) runs a fixed list of stages in the background, not
inside the request that starts it. Plugins see it only through this module: a
:data:`StageWrapper` receives the job's whole run and returns a run, and may set
``job.deadline`` (the time budget), read ``job.current`` (the stage running) or cancel
the run. The application that runs jobs (:mod:`ballast.sessions.finalize`) depends on
this contract, not the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ballast import budget

#: The end states of a job; ``running`` is the only other one.
END_STATES = ("succeeded", "failed", "timed_out")


def _pending(names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": s, "state": "pending", "duration_ms": None} for s in names]


@dataclass(slots=True)
class JobContext:
    """One attempt of a job as it runs in this process; ``record()`` is what is stored and served.

    ``state`` is the outcome once known; until ``done`` (the outcome durably stored)
    the record reads ``running``, so a client never sees an end state the store does
    not have yet. ``data`` carries what one stage hands to the next.
    """

    session_id: str
    attempt: int
    stage_names: Sequence[str] = ()
    tenant: str = "default"
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    deadline: budget.Deadline | None = None
    state: str = "running"
    current: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    done: bool = False
    elapsed_ms: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages:
            self.stages = _pending(self.stage_names)

    def elapsed(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def budget_ms(self) -> int | None:
        return None if self.deadline is None else int(self.deadline.budget_s * 1000)

    def progress(self) -> dict[str, Any]:
        """What is stored with the job: everything a client sees except state and attempt."""
        return {
            "budget_ms": self.budget_ms(),
            "elapsed_ms": self.elapsed_ms if self.done or self.state != "running" else self.elapsed(),
            "stages": [dict(s) for s in self.stages],
            "error": self.error,
            "started_at": self.started_at,
        }

    def record(self) -> dict[str, Any]:
        """The job as the API shows it now."""
        progress = self.progress()
        return {
            "state": self.state if self.done else "running",
            "attempt": self.attempt,
            "budget_ms": progress["budget_ms"],
            "elapsed_ms": progress["elapsed_ms"] if self.done else self.elapsed(),
            "stages": progress["stages"],
            "error": self.error if self.done else None,
        }


#: A job's whole run: ``async (job) -> None``.
JobRun = Callable[[JobContext], Awaitable[None]]
#: What ``ballast_finalize_wrappers`` returns a list of: ``(run) -> run``.
StageWrapper = Callable[[JobRun], JobRun]
