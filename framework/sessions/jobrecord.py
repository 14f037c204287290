"""The finalize job's state machine, as pure decisions every store adapter applies.

A session and its job change state together. Each transition below is ONE store
transaction: the adapter reads the session state and the job row (locking them), asks
the function here what to do (which checks the state it expects and the fencing token),
and writes the job row and the session state in that same transaction. Nothing here
does I/O, so the SQLite and PostgreSQL adapters share it and it is tested on its own.

::

    (none | failed | timed_out)  --START-->     running        session open|failed -> finalizing
    running (fence f)            --PROGRESS-->  running        fence must be f; renews the lease
    running (fence f)            --END-->       succeeded      session finalizing -> finalized (+ report)
    running (fence f)            --END-->       failed | timed_out   session finalizing -> failed
    running (fence f)            --RELEASE-->   running, unowned, lease expired (clean shutdown)
    running (lease expired)      --TAKEOVER-->  running (fence f + 1, new owner)
    running (taken over MAX_TAKEOVERS times) --TAKEOVER--> failed   session -> failed

Invariant kept by every transition: the session is ``finalizing`` exactly when its job
is ``running``; ``finalized`` exactly when its job ``succeeded`` (and a report exists).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from ballast.errors import Conflict, StoreError
from ballast.sessions.store import JobRecord, Lease, LeaseLost

JOB_STATES: Final = ("running", "succeeded", "failed", "timed_out")
END_STATES: Final = ("succeeded", "failed", "timed_out")

#: The session state each end state of a job leaves behind.
SESSION_AFTER: Final = {"succeeded": "finalized", "failed": "failed", "timed_out": "failed"}

#: A job taken over this many times is ended instead of run again: something in it
#: keeps stopping the processes that run it.
MAX_TAKEOVERS: Final = 3

#: The error of a job ended because its runs kept being interrupted.
ABANDONED_JOB_ERROR: Final = {
    "title": "Finalize interrupted",
    "detail": "The job was interrupted several times and was stopped; the session data "
              "is intact, run finalize again.",
}


def plan_start(session_id: str, session_state: str, job: JobRecord | None) -> bool:
    """START: True to start a new attempt; False to return the existing job as it is.

    Raises ``Conflict`` when the session cannot be finalized (finalized without a
    succeeded job cannot happen under the invariant, but is refused rather than run).
    """
    if job is not None and job.state in ("running", "succeeded"):
        return False
    if session_state == "finalized":
        raise Conflict(f"Session '{session_id}' is already finalized.")
    if session_state not in ("open", "failed"):
        raise Conflict(f"Session '{session_id}' cannot be finalized in its current state.")
    return True


def started(previous: JobRecord | None, owner: str, now: float, lease_s: float,
            progress: dict[str, Any]) -> JobRecord:
    """The record START writes: the next attempt, the next fence, leased to ``owner``."""
    return JobRecord(
        state="running",
        attempt=(previous.attempt + 1) if previous else 1,
        fence=(previous.fence + 1) if previous else 1,
        owner=owner,
        lease_expires=now + lease_s,
        heartbeat_at=now,
        takeovers=0,
        progress=progress,
    )


def check_lease(job: JobRecord | None, lease: Lease) -> JobRecord:
    """PROGRESS / RENEW / RELEASE precondition: the job runs under this very lease."""
    if job is None or job.state != "running" or job.fence != lease.fence:
        raise LeaseLost(internal=f"finalize job of {lease.tenant}/{lease.session_id} is no longer "
                                 f"held with fence {lease.fence}")
    return job


def plan_finish(session_state: str, job: JobRecord | None, lease: Lease, state: str,
                report: dict[str, Any] | None) -> str:
    """END: check the preconditions and return the session state to write."""
    if state not in END_STATES:
        raise ValueError(f"a job ends succeeded, failed or timed_out, not {state!r}")
    if state == "succeeded" and report is None:
        raise ValueError("a succeeded job needs its report")
    check_lease(job, lease)
    if session_state != "finalizing":
        raise StoreError(internal=f"session {lease.tenant}/{lease.session_id} is {session_state} "
                                  "while its job runs; the invariant is broken")
    return SESSION_AFTER[state]


def taken_over(job: JobRecord, owner: str, now: float, lease_s: float) -> JobRecord:
    """TAKEOVER: the claimed record, or (past MAX_TAKEOVERS) the ended one.

    The progress is reset to its stages' names: the new owner runs every stage again
    (stages are idempotent), so nothing of the old run's is shown as done.
    """
    if job.takeovers + 1 > MAX_TAKEOVERS:
        stages = [dict(s, state=("skipped" if s.get("state") == "pending" else s.get("state")))
                  for s in job.progress.get("stages", [])]
        for s in stages:
            if s["state"] == "running":
                s["state"] = "failed"
        return JobRecord("failed", job.attempt, job.fence + 1, None, 0.0, job.heartbeat_at,
                         job.takeovers, dict(job.progress, stages=stages, error=dict(ABANDONED_JOB_ERROR)))
    stages = [{"name": s.get("name"), "state": "pending", "duration_ms": None}
              for s in job.progress.get("stages", [])]
    return JobRecord("running", job.attempt, job.fence + 1, owner, now + lease_s, now,
                     job.takeovers + 1, dict(job.progress, stages=stages, error=None))


def released(job: JobRecord) -> JobRecord:
    """RELEASE: unowned, lease expired; the fence stays (a takeover moves it on)."""
    return JobRecord(job.state, job.attempt, job.fence, None, 0.0, job.heartbeat_at,
                     job.takeovers, job.progress)


# ---------------------------------------------------------------------- row codec
# The job table's columns, in this order, for every adapter:
# state, attempt, fence, owner, lease_expires, heartbeat_at, takeovers, progress (JSON).

JOB_COLUMNS: Final = ("state", "attempt", "fence", "owner", "lease_expires", "heartbeat_at",
                      "takeovers", "progress")


def job_row(job: JobRecord) -> tuple[str, int, int, str | None, float, float | None, int, str]:
    return (job.state, job.attempt, job.fence, job.owner, job.lease_expires, job.heartbeat_at,
            job.takeovers, orjson.dumps(job.progress).decode())


def job_from_row(row: Any) -> JobRecord:
    state, attempt, fence, owner, lease_expires, heartbeat_at, takeovers, progress = row
    return JobRecord(state, attempt, fence, owner, lease_expires, heartbeat_at, takeovers,
                     orjson.loads(progress))
