"""The session service: what the HTTP handlers ask for, above the store and inference.

Holds the rules of the API (states, idempotent mutations, one finalize job at a time per
session) and runs finalize jobs as background tasks. Knows no plugin: it is given the
executor for blocking work, the inference provider, the failure hook and the finalize
wrappers when the app is built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ballast import budget
from ballast.errors import Conflict, NotFound, Overloaded, UpstreamError
from ballast.executor import BlockingExecutor
from ballast.logging import get_logger
from ballast.resilience import republished
from ballast.sessions import analysis
from ballast.sessions.finalize import FinalizeRunner, JobContext, StageWrapper, public_job
from ballast.sessions.inference import InferenceProvider, ReportInput, ResolveInput
from ballast.sessions.store import SessionRecord, Store
from ballast.telemetry import Telemetry

T = TypeVar("T")
log = get_logger("ballast.sessions")
RESOLVE_UNAVAILABLE = "Speaker resolution temporarily unavailable"


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"Session '{session_id}' does not exist.")


class SessionService:
    def __init__(self, store: Store, executor: BlockingExecutor, provider: InferenceProvider,
                 finalize_wrappers: list[StageWrapper], telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.executor = executor
        self.provider = provider
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, JobContext] = {}
        self._lock = asyncio.Lock()
        self._runner = FinalizeRunner(
            {"freeze": self._freeze, "drain": self._drain, "replay": self._replay,
             "reconcile": self._reconcile, "stats": self._stats, "events": self._events,
             "report": self._report, "persist": self._persist},
            save=self._save_job, wrappers=finalize_wrappers, on_end=self._job_ended,
            telemetry=telemetry)

    # ---------------------------------------------------------------- sessions

    async def create(self, session_id: str, title: str | None, participants: list[str]) -> dict[str, Any]:
        record = await self.store.create_session(session_id, title, participants)
        return self._session_view(record, None)

    async def get(self, session_id: str) -> dict[str, Any]:
        # The hot read: one trip to the store. A running job is served from memory (it
        # is ahead of its stored record), so only then is the session read alone.
        live = self._live.get(session_id)
        if live is not None:
            record = await self.store.get_session(session_id)
            job: dict[str, Any] | None = live.record()
        else:
            record, job = await self.store.get_session_with_job(session_id)
        if record is None:
            raise _not_found(session_id)
        return self._session_view(record, job)

    async def _require(self, session_id: str) -> SessionRecord:
        record = await self.store.get_session(session_id)
        if record is None:
            raise _not_found(session_id)
        return record

    def _session_view(self, r: SessionRecord, job: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "session_id": r.session_id, "state": r.state, "title": r.title,
            "participants": [{"name": n} for n in r.participants],
            "mutation_count": r.mutation_count, "last_seq": r.last_seq,
            "speakers": r.speakers, "finalize": public_job(job) if job else None,
        }

    # ---------------------------------------------------------------- mutations

    async def append(self, session_id: str, mutations: list[dict[str, Any]]) -> dict[str, Any]:
        result = await self.store.append(session_id, mutations)
        return {"accepted": [{"id": a.id, "seq": a.seq, "duplicate": a.duplicate} for a in result.accepted],
                "last_seq": result.last_seq}

    async def list_mutations(self, session_id: str, after: int, limit: int) -> dict[str, Any]:
        await self._require(session_id)
        rows = await self.store.list_mutations(session_id, after, limit)
        next_after = rows[-1]["seq"] if len(rows) == limit else None
        return {"mutations": rows, "next_after": next_after}

    # ---------------------------------------------------------------- resolve

    async def resolve(self, session_id: str) -> dict[str, Any]:
        record = await self._require(session_id)
        if record.state != "open":
            raise Conflict(f"Session '{session_id}' is {record.state}; speakers are resolved only "
                           "while it is open.")
        utterances = await self.executor.run(self._utterances, session_id)
        try:
            reply = await self.provider.resolve(ResolveInput(
                session_id, list(record.participants), utterances, dict(record.speakers)))
        except UpstreamError as exc:
            # Keeps a local refusal's 503 and Retry-After; an upstream failure stays 502.
            raise republished(exc, RESOLVE_UNAVAILABLE) from exc
        labels = {u[0] for u in utterances}
        mapping = {k: v for k, v in reply.mapping.items() if k in labels and v}
        if mapping:
            await self.store.append(session_id, [{"type": "speakers_resolved", "mapping": mapping}])
        updated = await self._require(session_id)
        return {"speakers": updated.speakers, **({"degraded": True} if reply.degraded else {})}

    def _utterances(self, session_id: str) -> list[tuple[str, int, int, str]]:
        return [(r["speaker"], r["start_ms"], r["end_ms"], r["text"])
                for r in self.store.iter_mutations(session_id) if r["type"] == "utterance"]

    # ---------------------------------------------------------------- finalize

    async def _job(self, session_id: str) -> dict[str, Any] | None:
        live = self._live.get(session_id)
        if live is not None:
            return live.record()
        return await self.store.get_job(session_id)

    async def get_job(self, session_id: str) -> dict[str, Any]:
        await self._require(session_id)
        job = await self._job(session_id)
        if job is None:
            raise NotFound(f"Session '{session_id}' has no finalize job; POST to start one.")
        return public_job(job)

    async def start_finalize(self, session_id: str) -> dict[str, Any]:
        async with self._lock:
            record = await self._require(session_id)
            previous = await self._job(session_id)
            if previous is not None and previous["state"] in ("running", "succeeded"):
                return public_job(previous)
            if record.state == "finalized":
                raise Conflict(f"Session '{session_id}' is already finalized.")
            job = JobContext(session_id, attempt=(previous["attempt"] + 1) if previous else 1)
            self._live[session_id] = job
            await self._save_job(job)
            with budget.unbounded():  # the job has its own budget, not this request's
                self._jobs[session_id] = asyncio.create_task(self._runner.execute(job),
                                                             name=f"finalize:{session_id}")
            return public_job(job.record())

    async def _save_job(self, job: JobContext) -> None:
        await self.store.save_job(job.session_id, job.record())

    async def _job_ended(self, job: JobContext) -> None:
        try:
            if job.state != "succeeded":
                await self.store.set_state(job.session_id, "failed", expect=("finalizing",))
        finally:
            job.done = True
            try:
                await self._save_job(job)
            finally:
                # A client that saw this job end may already have started the next
                # attempt while the record was being saved: leave that one registered.
                if self._live.get(job.session_id) is job:
                    del self._live[job.session_id]
                if self._jobs.get(job.session_id) is asyncio.current_task():
                    del self._jobs[job.session_id]

    async def _job_blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Blocking work of a finalize job: wait for capacity rather than fail the job.

        A request refused by a full executor is answered 503 and its client retries; a
        background job has no client to do that, so it retries here, with backoff, for
        as long as its time budget allows.
        """
        delay = 0.02
        while True:
            try:
                return await self.executor.run(fn, *args)
            except Overloaded:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _freeze(self, job: JobContext) -> None:
        if not await self.store.set_state(job.session_id, "finalizing", expect=("open", "failed")):
            raise Conflict(f"Session '{job.session_id}' cannot be finalized in its current state.")

    async def _drain(self, job: JobContext) -> None:
        await self.store.drain(job.session_id)

    async def _replay(self, job: JobContext) -> None:
        # Frozen and drained: this record stays current for the rest of the job.
        record = job.data["record"] = await self._require(job.session_id)
        job.data["state"] = await self._job_blocking(
            lambda: analysis.replay(self.store.iter_mutations(job.session_id), record.participants))

    async def _reconcile(self, job: JobContext) -> None:
        job.data["reconciled"] = await self._job_blocking(analysis.reconcile, job.data.pop("state"))

    async def _stats(self, job: JobContext) -> None:
        job.data["stats"] = await self._job_blocking(analysis.compute_stats, job.data["reconciled"])

    async def _events(self, job: JobContext) -> None:
        job.data["timeline"] = await self._job_blocking(analysis.build_timeline, job.data["reconciled"])

    async def _report(self, job: JobContext) -> None:
        record: SessionRecord = job.data["record"]
        rec = job.data["reconciled"]
        stats = job.data["stats"]
        draft = await self.provider.report(ReportInput(
            session_id=job.session_id, title=record.title, participants=list(record.participants),
            speakers=dict(rec.state.speakers), stats=stats, utterances=rec.utterances(),
            notes=[n.text for n in rec.state.notes]))
        job.data["report"] = {
            "session_id": job.session_id, "title": record.title,
            "summary": draft.summary, "highlights": list(draft.highlights),
            "action_items": [{"owner": a.owner, "text": a.text} for a in draft.action_items],
            "stats": stats["totals"], "speakers": stats["speakers"],
            "timeline": job.data["timeline"],
            "generated_at": datetime.now(UTC).isoformat(),
            **({"degraded": True} if draft.degraded else {}),
        }

    async def _persist(self, job: JobContext) -> None:
        await self.store.save_report(job.session_id, job.data.pop("report"))
        await self.store.set_state(job.session_id, "finalized", expect=("finalizing",))
        job.data.clear()

    async def get_report(self, session_id: str) -> dict[str, Any]:
        await self._require(session_id)
        report = await self.store.get_report(session_id)
        if report is None:
            raise NotFound(f"Session '{session_id}' has no report yet; finalize it first.")
        return report

    async def close(self) -> None:
        """Cancel running jobs (each is recorded as interrupted), then stop."""
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
