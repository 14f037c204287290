"""The finalize job: eight stages that turn a session's mutation log into a report.

A job runs in the background, not inside the request that starts it, under a lease in
the store (:mod:`ballast.sessions.jobrecord` is its state machine):

* START (done by the service) stores the job ``running`` and the session
  ``finalizing`` in one transaction; that is the ``freeze`` stage's effect.
* While it runs, the runner renews the lease (a heartbeat every third of the lease)
  and stores progress after each stage; both name the job's fencing token, so a process
  whose job was taken over learns it at its next write and stops (``LeaseLost``).
* END is the ``persist`` stage: the report, the job's end state and the session's end
  state are written in ONE transaction. It is outside the time budget and is retried
  with capped backoff until the store takes it, so no timeout, cancellation or store
  outage can leave the job and its session disagreeing; meanwhile the job reads
  ``running`` (it has not ended in the store), never a state the store does not have.
* A shutdown releases the lease (the job stays ``running``), so the next process to
  start claims it at once and runs it again. Every stage is idempotent: running a job
  twice (at-least-once) gives the same report.

Plugins wrap the run of the stages before ``persist`` (``ballast_finalize_wrappers``):
the timeout budget sets ``job.deadline`` and cancels a hung stage; the core checks the
deadline between stages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final, TypeVar

from ballast import budget
from ballast.errors import BallastError, BudgetExceeded, Overloaded, UpstreamError
from ballast.jobs import JobContext, JobRun, StageWrapper
from ballast.logging import get_logger
from ballast.sessions.store import Lease, LeaseLost, Store
from ballast.telemetry import Telemetry

STAGES: Final = ("freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist")

#: Backoff of the END write while the store refuses it: first delay and cap (seconds).
END_RETRY_FIRST_S: Final = 0.05
END_RETRY_MAX_S: Final = 2.0

#: How long a shutting-down process tries to hand its job's lease back.
RELEASE_TIMEOUT_S: Final = 2.0

T = TypeVar("T")
StageFn = Callable[[JobContext], Awaitable[None]]

log = get_logger("ballast.finalize")

TIMED_OUT_ERROR: Final = {
    "title": "Finalize timed out",
    "detail": "The job did not finish within its time budget; the session data is intact, "
              "run finalize again.",
}


def public_error(stage: str | None, exc: BaseException) -> dict[str, str]:
    """What a client may read about a failed stage."""
    if isinstance(exc, UpstreamError):
        return {"title": "Report generation unavailable",
                "detail": "The inference service was temporarily unavailable; run finalize again."}
    if isinstance(exc, BallastError) and exc.status < 500:
        return {"title": exc.title, "detail": exc.public_detail}
    return {"title": "Finalize failed",
            "detail": f"The {stage or 'finalize'} stage failed; the session data is intact, "
                      "run finalize again."}


async def until_capacity(call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, again and again while the executor is full.

    A request refused by a full executor is answered 503 and its client retries; a
    background job has no client to do that, so it waits here, with backoff. The job's
    time budget (enforced by cancellation) is what bounds the wait: a job fails for
    overload only when its budget runs out.
    """
    delay = 0.02
    while True:
        try:
            return await call()
        except Overloaded:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


class FinalizeRunner:
    """Runs one leased job to an end state that the store has durably taken."""

    def __init__(self, stages: dict[str, StageFn], store: Store, wrappers: list[StageWrapper],
                 *, lease_s: float, telemetry: Telemetry | None = None) -> None:
        tel = self._telemetry = telemetry or Telemetry()
        self._jobs_total = tel.counter("ballast_finalize_jobs_total")
        self._stage_seconds = tel.histogram("ballast_finalize_stage_duration_seconds")
        self._stages = stages
        self._store = store
        self._lease_s = lease_s
        run: JobRun = self._run_stages
        for wrap in reversed(wrappers):
            run = wrap(run)
        self._run = run

    async def execute(self, job: JobContext, lease: Lease) -> None:
        """Run the job to its end; never raises except on cancellation (a shutdown)."""
        task = asyncio.current_task()
        assert task is not None
        lost: list[bool] = []
        beat = asyncio.create_task(self._heartbeat(job, lease, task, lost),
                                   name=f"finalize-lease:{job.session_id}")
        try:
            try:
                with self._telemetry.span("finalize", session_id=job.session_id, job_attempt=job.attempt):
                    await self._outcome(job, lease)
                    with self._persist_span(job):
                        await self._end(job, lease)
            except LeaseLost:
                lost.append(True)
            except asyncio.CancelledError:
                if not lost:
                    await self._release(job, lease)
                    raise
                task.uncancel()
            if lost:
                log.warning("finalize.lease_lost", session_id=job.session_id, attempt=job.attempt,
                            stage=job.current)
        finally:
            beat.cancel()

    # ------------------------------------------------------------------ the stages

    async def _run_stages(self, job: JobContext) -> None:
        for i, info in enumerate(job.stages):
            name = info["name"]
            if name not in self._stages:  # persist: the END transition, outside the run
                break
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
            following = job.stages[i + 1]["name"] if i + 1 < len(job.stages) else None
            if following in self._stages:  # before persist, the END write carries it
                await self._save_progress(job, job.data["lease"])

    async def _save_progress(self, job: JobContext, lease: Lease) -> None:
        """Store progress for readers in other processes; a store error only delays it."""
        try:
            await self._store.save_progress(lease, job.progress(), self._lease_s)
        except LeaseLost:
            raise
        except Exception as exc:  # progress is advisory; the END write is not
            log.warning("finalize.progress_not_saved", session_id=job.session_id,
                        attempt=job.attempt, stage=job.current, error_type=type(exc).__name__)

    async def _outcome(self, job: JobContext, lease: Lease) -> None:
        """Run the wrapped stages; set ``job.state`` and ``job.error`` from how they ended."""
        job.data["lease"] = lease
        try:
            await self._run(job)
            job.state = "succeeded"
        except BudgetExceeded:
            job.state = "timed_out"
            self._mark_current(job, "timed_out")
            job.error = dict(TIMED_OUT_ERROR)
            log.warning("finalize.timed_out", session_id=job.session_id, attempt=job.attempt,
                        stage=job.current, budget_ms=job.budget_ms(), elapsed_ms=job.elapsed())
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as exc:
            job.state = "failed"
            self._mark_current(job, "failed")
            job.error = public_error(job.current, exc)
            log.error("finalize.failed", session_id=job.session_id, attempt=job.attempt,
                      stage=job.current, error_type=type(exc).__name__, error=str(exc))

    # ------------------------------------------------------------------ END

    async def _end(self, job: JobContext, lease: Lease) -> None:
        """The END transition, retried with capped backoff until the store takes it."""
        report = job.data.pop("report", None) if job.state == "succeeded" else None
        t0 = time.perf_counter()
        persist = job.stages[-1]
        if job.state == "succeeded":
            job.current = persist["name"]
            persist["state"] = "running"
        for info in job.stages:
            if info["state"] == "pending" and job.state != "succeeded":
                info["state"] = "skipped"
        delay, tries = END_RETRY_FIRST_S, 0
        while True:
            job.elapsed_ms = job.elapsed()
            progress = job.progress()  # copies: what is stored is the job as it will end
            if job.state == "succeeded":
                progress["stages"][-1].update(
                    state="succeeded", duration_ms=int((time.perf_counter() - t0) * 1000))
            try:
                await self._store.finish_job(lease, job.state, progress, report)
                break
            except LeaseLost:
                if not await self._ended_by_us(job, lease):
                    raise
                break
            except Exception as exc:  # any store failure: try again
                tries += 1
                log.warning("finalize.end_retry", session_id=job.session_id, attempt=job.attempt,
                            state=job.state, tries=tries, retry_in_ms=int(delay * 1000),
                            error_type=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, END_RETRY_MAX_S)
        self._jobs_total.inc(job.state)
        if job.state == "succeeded":
            persist["state"] = "succeeded"
            seconds = time.perf_counter() - t0
            persist["duration_ms"] = int(seconds * 1000)
            self._stage_seconds.observe(seconds, persist["name"])
            log.info("finalize.stage", session_id=job.session_id, attempt=job.attempt,
                     stage=persist["name"], state="succeeded", duration_ms=persist["duration_ms"])
        job.data.clear()
        job.done = True
        log.info("finalize.completed", session_id=job.session_id, attempt=job.attempt,
                 state=job.state, elapsed_ms=job.elapsed_ms)

    def _persist_span(self, job: JobContext) -> AbstractContextManager[object]:
        """The span of the persist stage: the END transition of a job that succeeded."""
        if job.state != "succeeded":
            return nullcontext()
        return self._telemetry.span("finalize persist", stage="persist")

    async def _ended_by_us(self, job: JobContext, lease: Lease) -> bool:
        """After LeaseLost on END: did an earlier try of ours commit (its answer was lost)?"""
        try:
            stored = await self._store.get_job(lease.tenant, lease.session_id)
        except Exception:  # unknown: treat the job as no longer ours
            return False
        return stored is not None and stored.fence == lease.fence and stored.state == job.state

    # ------------------------------------------------------------------ the lease

    async def _heartbeat(self, job: JobContext, lease: Lease, run: asyncio.Task[Any],
                         lost: list[bool]) -> None:
        interval = self._lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._store.renew_lease(lease, self._lease_s)
            except LeaseLost:
                lost.append(True)
                run.cancel()
                return
            except Exception as exc:  # keep beating; the lease may still hold
                log.warning("finalize.lease_renew_failed", session_id=job.session_id,
                            attempt=job.attempt, error_type=type(exc).__name__)

    async def _release(self, job: JobContext, lease: Lease) -> None:
        """Shutdown: hand the lease back so the next process claims the job at once."""
        try:
            await asyncio.wait_for(self._store.release_job(lease), RELEASE_TIMEOUT_S)
            released = True
        except (Exception, asyncio.CancelledError):  # the lease then simply expires
            released = False
        log.info("finalize.released", session_id=job.session_id, attempt=job.attempt,
                 stage=job.current, released=released)

    @staticmethod
    def _mark_current(job: JobContext, state: str) -> None:
        for info in job.stages:
            if info["name"] == job.current and info["state"] in ("running", "pending"):
                info["state"] = state
