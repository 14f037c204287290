"""The finalize job: eight stages that turn a session's mutation log into a report.

A job runs in the background, not inside the request that starts it. Its state and
per-stage timings are persisted after every stage, so ``GET .../finalize`` can follow it
and a crash leaves a record that the next start marks failed. A job that fails or runs
out of budget changes nothing but the session's state and the job record: the log stays,
and finalize can be run again.

Plugins wrap the whole run (``ballast_finalize_wrappers``): the timeout budget sets
``job.deadline`` and cancels a hung stage; the core checks the deadline between stages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ballast import budget
from ballast.errors import BallastError, BudgetExceeded, UpstreamError
from ballast.logging import get_logger
from ballast.telemetry import Telemetry

STAGES = ("freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist")

log = get_logger("ballast.finalize")


@dataclass(slots=True)
class JobContext:
    """One finalize attempt as it runs; ``record()`` is what is persisted and served."""

    session_id: str
    attempt: int
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    deadline: budget.Deadline | None = None
    state: str = "running"
    current: str | None = None
    stages: list[dict[str, Any]] = field(
        default_factory=lambda: [{"name": s, "state": "pending", "duration_ms": None} for s in STAGES])
    error: dict[str, str] | None = None
    #: Set once the end state is fully applied (session state first): until then the job
    #: reads as running, so a client never sees a failed job on a still-finalizing session.
    done: bool = False
    elapsed_ms: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def record(self) -> dict[str, Any]:
        elapsed = self.elapsed_ms if self.done else self.elapsed()
        return {
            "state": self.state if self.done else "running",
            "attempt": self.attempt,
            "budget_ms": None if self.deadline is None else int(self.deadline.budget_s * 1000),
            "elapsed_ms": elapsed,
            "stages": [dict(s) for s in self.stages],
            "error": self.error,
            "started_at": self.started_at,
        }


JobRun = Callable[[JobContext], Awaitable[None]]
StageWrapper = Callable[[JobRun], JobRun]
StageFn = Callable[[JobContext], Awaitable[None]]


def public_job(record: dict[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (internal bookkeeping keys dropped)."""
    return {k: record[k] for k in ("state", "attempt", "budget_ms", "elapsed_ms", "stages", "error")}


def _public_error(stage: str | None, exc: BaseException) -> dict[str, str]:
    if isinstance(exc, UpstreamError):
        return {"title": "Report generation unavailable",
                "detail": "The inference service was temporarily unavailable; run finalize again."}
    if isinstance(exc, BallastError) and exc.status < 500:
        return {"title": exc.title, "detail": exc.public_detail}
    return {"title": "Finalize failed",
            "detail": f"The {stage or 'finalize'} stage failed; the session data is intact, "
                      "run finalize again."}


class FinalizeRunner:
    """Runs the stages of one job, persisting the record as it goes."""

    def __init__(self, stages: dict[str, StageFn], save: Callable[[JobContext], Awaitable[None]],
                 wrappers: list[StageWrapper],
                 on_end: Callable[[JobContext], Awaitable[None]],
                 telemetry: Telemetry | None = None) -> None:
        tel = self._telemetry = telemetry or Telemetry()
        self._jobs_total = tel.counter("ballast_finalize_jobs_total")
        self._stage_seconds = tel.histogram("ballast_finalize_stage_duration_seconds")
        self._stages = stages
        self._save = save
        self._on_end = on_end
        run: JobRun = self._run_stages
        for wrap in reversed(wrappers):
            run = wrap(run)
        self._run = run

    async def _run_stages(self, job: JobContext) -> None:
        for info in job.stages:
            name = info["name"]
            job.current = name
            if job.deadline is not None:
                job.deadline.check(f"stage {name}")
            info["state"] = "running"
            t0 = time.perf_counter()
            scope = budget.deadline_scope(job.deadline) if job.deadline else None
            try:
                with self._telemetry.span(f"finalize {name}", stage=name):
                    if scope is None:
                        await self._stages[name](job)
                    else:
                        with scope:
                            await self._stages[name](job)
            finally:
                seconds = time.perf_counter() - t0
                info["duration_ms"] = int(seconds * 1000)
                self._stage_seconds.observe(seconds, name)
            info["state"] = "succeeded"
            log.info("finalize.stage", session_id=job.session_id, attempt=job.attempt, stage=name,
                     state="succeeded", duration_ms=info["duration_ms"])
            await self._save(job)

    async def execute(self, job: JobContext) -> None:
        """Run the job to an end state; never raises except on cancellation."""
        try:
            await self._run(job)
            job.state = "succeeded"
        except BudgetExceeded:
            job.state = "timed_out"
            self._mark_current(job, "timed_out")
            job.error = {"title": "Finalize timed out",
                         "detail": "The job did not finish within its time budget; "
                                   "the session data is intact, run finalize again."}
            log.warning("finalize.timed_out", session_id=job.session_id, attempt=job.attempt,
                        stage=job.current, budget_ms=job.record()["budget_ms"], elapsed_ms=job.elapsed())
        except asyncio.CancelledError:
            job.state = "failed"
            self._mark_current(job, "failed")
            job.error = {"title": "Finalize interrupted",
                         "detail": "The server stopped while the job was running; run finalize again."}
            await self._finish(job)
            raise
        except Exception as exc:
            job.state = "failed"
            self._mark_current(job, "failed")
            job.error = _public_error(job.current, exc)
            log.error("finalize.failed", session_id=job.session_id, attempt=job.attempt,
                      stage=job.current, error_type=type(exc).__name__, error=str(exc))
        await self._finish(job)

    async def _finish(self, job: JobContext) -> None:
        job.elapsed_ms = job.elapsed()
        for info in job.stages:
            if info["state"] == "pending" and job.state != "succeeded":
                info["state"] = "skipped"
        self._jobs_total.inc(job.state)
        try:
            await self._on_end(job)
        finally:
            log.info("finalize.completed", session_id=job.session_id, attempt=job.attempt,
                     state=job.state, elapsed_ms=job.elapsed_ms)

    @staticmethod
    def _mark_current(job: JobContext, state: str) -> None:
        for info in job.stages:
            if info["name"] == job.current and info["state"] in ("running", "pending"):
                info["state"] = state
