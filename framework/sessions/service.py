"""The session service: what the HTTP handlers ask for, above the store and inference.

Holds the rules of the API (states, idempotent mutations, one finalize job at a time per
session) and runs finalize jobs as background tasks. Every method takes the caller's
tenant and passes it to the store, which sees only that tenant's sessions: another
tenant's session is exactly as absent as one that never existed. Knows no plugin: it is
given the executor for blocking work, the inference provider, the failure hook and the
finalize wrappers when the app is built.

Finalize jobs are leased (see :mod:`ballast.sessions.finalize`). A job is live in this
process only once its START transaction has committed AND its task exists; both happen
in one shielded step, so a request cancelled meanwhile (its budget ran out) cannot
leave a stored job without a task. A sweeper claims jobs whose lease expired (their
process died) and carries them to an end here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ballast import budget
from ballast.errors import Conflict, NotFound, UpstreamError
from ballast.executor import BlockingExecutor
from ballast.inference import InferenceProvider, ReportInput, ResolveInput
from ballast.jobs import JobContext, StageWrapper
from ballast.logging import get_logger
from ballast.resilience import republished
from ballast.sessions import analysis
from ballast.sessions.finalize import STAGES, FinalizeRunner, until_capacity
from ballast.sessions.naming import Naming, name_unnamed
from ballast.sessions.patience import patient
from ballast.sessions.people import names_by_label
from ballast.sessions.store import Lease, SessionRecord, Store, session_not_found
from ballast.sessions.transcript import StoredTranscript
from ballast.sessions.waiters import JobWaiters, wait_for
from ballast.telemetry import Telemetry

T = TypeVar("T")
log = get_logger("ballast.sessions")
RESOLVE_UNAVAILABLE = "Speaker resolution temporarily unavailable"
#: A waiting request answers this long before its own time budget runs out.
WAIT_MARGIN_S = 0.5

Key = tuple[str, str]  # (tenant, session_id)


def process_owner() -> str:
    """A lease owner id unique to this process (host, pid and a random part)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


class SessionService:
    def __init__(self, store: Store, executor: BlockingExecutor, provider: InferenceProvider,
                 finalize_wrappers: list[StageWrapper], *, lease_s: float = 15.0,
                 owner: str | None = None, telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.executor = executor
        self.provider = provider
        self.lease_s = lease_s
        self.owner = owner or process_owner()
        self._jobs: dict[Key, asyncio.Task[None]] = {}
        self._live: dict[Key, JobContext] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.waiters: JobWaiters[Key] = JobWaiters()
        self._runner = FinalizeRunner(
            {"freeze": self._freeze, "drain": self._drain, "replay": self._replay,
             "reconcile": self._reconcile, "stats": self._stats, "events": self._events,
             "report": self._report},
            store, finalize_wrappers, lease_s=lease_s, telemetry=telemetry)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Claim the jobs left behind by stopped processes, then keep sweeping for them.

        Returns how many jobs were claimed now.
        """
        try:
            claimed = await self._claim()
        except Exception as exc:  # a busy store must not stop the server starting
            log.warning("finalize.claim_failed", error_type=type(exc).__name__)
            claimed = 0
        if claimed:
            log.warning("finalize.recovered", jobs=claimed)
        self._sweeper = asyncio.create_task(self._sweep(), name="finalize-sweeper")
        return claimed

    async def close(self) -> None:
        """Stop sweeping; cancel running jobs, each handing its lease back."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        interval = max(0.2, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._claim()
            except Exception as exc:  # the next sweep tries again
                log.warning("finalize.claim_failed", error_type=type(exc).__name__)

    async def _claim(self) -> int:
        claimed = await self.store.claim_expired_jobs(self.owner, self.lease_s)
        for c in claimed:
            job = JobContext(c.lease.session_id, c.job.attempt, STAGES, tenant=c.lease.tenant)
            log.warning("finalize.taken_over", session_id=c.lease.session_id, attempt=c.job.attempt,
                        takeovers=c.job.takeovers)
            self._launch(job, c.lease)
        return len(claimed)

    # ---------------------------------------------------------------- sessions

    async def create(self, tenant: str, session_id: str, title: str | None,
                     participants: list[str]) -> dict[str, Any]:
        record = await self.store.create_session(tenant, session_id, title, participants)
        return self._session_view(record, None)

    async def get(self, tenant: str, session_id: str) -> dict[str, Any]:
        # The hot read: one trip to the store. A running job is served from memory (it
        # is ahead of its stored record), so only then is the session read alone.
        live = self._live.get((tenant, session_id))
        if live is not None:
            record = await self.store.get_session(tenant, session_id)
            job: dict[str, Any] | None = live.record()
        else:
            record, stored = await self.store.get_session_with_job(tenant, session_id)
            job = None if stored is None else stored.view()
        if record is None:
            raise session_not_found(session_id)
        return self._session_view(record, job)

    async def list_sessions(self, tenant: str, after: str | None, limit: int) -> dict[str, Any]:
        """The tenant's sessions in creation order, a page at a time."""
        pairs = await self.store.list_sessions(tenant, after, limit)
        views = []
        for record, stored in pairs:
            live = self._live.get((tenant, record.session_id))
            job = live.record() if live is not None else (None if stored is None else stored.view())
            views.append(self._session_view(record, job))
        next_after = pairs[-1][0].session_id if len(pairs) == limit else None
        return {"sessions": views, "next_after": next_after}

    async def _require(self, tenant: str, session_id: str) -> SessionRecord:
        record = await self.store.get_session(tenant, session_id)
        if record is None:
            raise session_not_found(session_id)
        return record

    def _session_view(self, r: SessionRecord, job: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "session_id": r.session_id, "state": r.state, "title": r.title,
            "participants": [{"name": n} for n in r.participants],
            "mutation_count": r.mutation_count, "last_seq": r.last_seq,
            "speakers": r.speakers, "finalize": job,
        }

    # ---------------------------------------------------------------- mutations

    async def append(self, tenant: str, session_id: str, mutations: list[dict[str, Any]]) -> dict[str, Any]:
        result = await self.store.append(tenant, session_id, mutations)
        return {"accepted": [{"id": a.id, "seq": a.seq, "duplicate": a.duplicate} for a in result.accepted],
                "last_seq": result.last_seq}

    async def list_mutations(self, tenant: str, session_id: str, after: int, limit: int) -> dict[str, Any]:
        await self._require(tenant, session_id)
        rows = await self.store.list_mutations(tenant, session_id, after, limit)
        next_after = rows[-1]["seq"] if len(rows) == limit else None
        return {"mutations": rows, "next_after": next_after}

    # ---------------------------------------------------------------- resolve

    async def resolve(self, tenant: str, session_id: str) -> dict[str, Any]:
        record = await self._require(tenant, session_id)
        if record.state != "open":
            raise Conflict(f"Session '{session_id}' is {record.state}; speakers are resolved only "
                           "while it is open.")
        # Read on demand: a prompt reads the transcript's ends, the builtin streams it.
        transcript = StoredTranscript(self.store, tenant, session_id, record.last_seq)
        try:
            reply = await self.provider.resolve(ResolveInput(
                session_id, list(record.participants), transcript, dict(record.speakers)))
        except UpstreamError as exc:
            # Keeps a local refusal's 503 and Retry-After; an upstream failure stays 502.
            raise republished(exc, RESOLVE_UNAVAILABLE) from exc
        # Providers answer only for labels they saw (or were told of), so no label that
        # never spoke comes back.
        mapping = {k: v for k, v in reply.mapping.items() if v}
        if mapping:
            await self.store.append(tenant, session_id, [{"type": "speakers_resolved", "mapping": mapping}])
        updated = await self._require(tenant, session_id)
        return {"speakers": updated.speakers, **({"degraded": True} if reply.degraded else {})}

    # ---------------------------------------------------------------- finalize

    async def _job(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        live = self._live.get((tenant, session_id))
        if live is not None:
            return live.record()
        stored = await self.store.get_job(tenant, session_id)
        return None if stored is None else stored.view()

    async def get_job(self, tenant: str, session_id: str) -> dict[str, Any]:
        await self._require(tenant, session_id)
        job = await self._job(tenant, session_id)
        if job is None:
            raise NotFound(f"Session '{session_id}' has no finalize job; POST to start one.")
        return job

    async def wait_job(self, tenant: str, session_id: str, wait_s: float,
                       wanted: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        """The job, once it is no longer running or after ``wait_s`` seconds, whichever
        comes first; the wait is cut short to fit the request's own time budget. When
        ``wanted()`` turns false meanwhile (the client left), the job is not read again.

        Woken by the end of a job this process runs; a job another process runs (after
        a takeover) is seen when the wait is over.
        """
        with self.waiters.watching((tenant, session_id)) as ended:
            job = await self.get_job(tenant, session_id)
            if job["state"] != "running":
                return job
            left = budget.remaining()
            if left is not None:
                wait_s = min(wait_s, left - WAIT_MARGIN_S)
            await wait_for(ended, wait_s)
        return await self.get_job(tenant, session_id) if wanted() else job

    async def start_finalize(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Start a finalize attempt, or return the job that runs (or has succeeded).

        Shielded: once the START transaction is sent, its outcome is followed through
        even if this request is cancelled (its budget ran out), so a committed job
        always gets its task, and an uncommitted one leaves nothing behind.
        """
        live = self._live.get((tenant, session_id))
        if live is not None:
            return live.record()
        return await asyncio.shield(self._start(tenant, session_id))

    async def _start(self, tenant: str, session_id: str) -> dict[str, Any]:
        job = JobContext(session_id, 0, STAGES, tenant=tenant)
        start = await self.store.start_job(tenant, session_id, self.owner, self.lease_s, job.progress())
        if start.lease is None:
            live = self._live.get((tenant, session_id))
            return live.record() if live is not None else start.job.view()
        job.attempt = start.job.attempt
        self._launch(job, start.lease)
        # Let the job's task begin: its wrappers set the budget, which the 202 then shows.
        await asyncio.sleep(0)
        return job.record()

    def _launch(self, job: JobContext, lease: Lease) -> None:
        """Register the job and create its task, with no await in between."""
        key = (job.tenant, job.session_id)
        self._live[key] = job
        # The job has its own budget, not the request's, and the blocking work done for
        # it (the provider's included) waits for executor capacity rather than fail.
        with budget.unbounded(), patient():
            self._jobs[key] = asyncio.create_task(self._execute(job, lease),
                                                  name=f"finalize:{job.session_id}")

    async def _execute(self, job: JobContext, lease: Lease) -> None:
        key = (job.tenant, job.session_id)
        try:
            await self._runner.execute(job, lease)
        finally:
            # A client that saw this job end may already have started the next attempt:
            # leave that one registered.
            if self._live.get(key) is job:
                del self._live[key]
            if self._jobs.get(key) is asyncio.current_task():
                del self._jobs[key]
            self.waiters.notify(key)

    async def _job_blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Blocking work of a finalize job, waiting for executor capacity within its budget."""
        return await until_capacity(lambda: self.executor.run(fn, *args))

    async def _freeze(self, job: JobContext) -> None:
        # START set the session finalizing in the job's own transaction: no append
        # commits after it, so there is nothing left to do but record the stage.
        return None

    async def _drain(self, job: JobContext) -> None:
        await self.store.drain(job.tenant, job.session_id)

    async def _replay(self, job: JobContext) -> None:
        # Frozen and drained: this record stays current for the rest of the job.
        record = await self._require(job.tenant, job.session_id)
        job.data["record"] = record
        job.data["state"] = await self._job_blocking(
            lambda: analysis.replay(self.store.iter_mutations(job.tenant, job.session_id),
                                    record.participants))

    async def _reconcile(self, job: JobContext) -> None:
        state = job.data.pop("state")
        naming = job.data["naming"] = await name_unnamed(self.provider, job.session_id, state)
        job.data["reconciled"] = await self._job_blocking(analysis.reconcile, state, naming.inferred)

    async def _stats(self, job: JobContext) -> None:
        job.data["stats"] = await self._job_blocking(analysis.compute_stats, job.data["reconciled"])

    async def _events(self, job: JobContext) -> None:
        job.data["timeline"] = await self._job_blocking(analysis.build_timeline, job.data["reconciled"])

    async def _report(self, job: JobContext) -> None:
        record: SessionRecord = job.data["record"]
        rec = job.data["reconciled"]
        stats = job.data["stats"]
        naming: Naming = job.data["naming"]
        data = ReportInput(
            session_id=job.session_id, title=record.title, participants=list(record.participants),
            speakers=names_by_label({**naming.inferred, **rec.state.speakers}, rec.people),
            stats=stats, utterances=rec.utterances(), notes=[n.text for n in rec.state.notes])
        # The builtin provider runs on the executor: wait for capacity like every stage.
        draft = await until_capacity(lambda: self.provider.report(data))
        job.data["report"] = {
            "session_id": job.session_id, "title": record.title,
            "summary": draft.summary, "highlights": list(draft.highlights),
            "action_items": [{"owner": a.owner, "text": a.text} for a in draft.action_items],
            "stats": stats["totals"], "speakers": stats["speakers"],
            "timeline": job.data["timeline"],
            "speaker_naming": naming.report_field(),
            "generated_at": datetime.now(UTC).isoformat(),
            **({"degraded": True} if draft.degraded else {}),
        }

    async def get_report(self, tenant: str, session_id: str) -> dict[str, Any]:
        await self._require(tenant, session_id)
        report = await self.store.get_report(tenant, session_id)
        if report is None:
            raise NotFound(f"Session '{session_id}' has no report yet; finalize it first.")
        return report

