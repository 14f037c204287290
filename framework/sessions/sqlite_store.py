"""The embedded SQLite adapter of the store port, with group commit.

Every write (appends, session creation, job transitions) goes to ONE writer thread with
its own connection (:mod:`ballast.sessions.groupcommit`), which applies whatever has
queued up in one transaction and commits once. Each write of a group runs inside its
own SAVEPOINT, so one that fails (a constraint, a trigger, a limit) is rolled back
alone, its caller gets the error, and the rest of its group still commits.

Reads use a small pool of separate connections on their own threads: in WAL mode they
read the last committed state while the writer writes. No SQLite call ever runs on the
event loop. Several server processes may share one file: SQLite's write lock orders
their transactions, and each process's writer waits for it up to the busy timeout.

The SQL itself is in :mod:`ballast.sessions.sqlite_ops`, the schema and its migrations
in :mod:`ballast.sessions.sqlite_schema`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from ballast.errors import StoreError
from ballast.sessions import sqlite_ops as ops
from ballast.sessions.commit_metrics import CommitMetrics
from ballast.sessions.groupcommit import Outcome, ReadPool, Request, WriteQueue, WriterStats
from ballast.sessions.jobrecord import END_STATES
from ballast.sessions.sqlite_schema import migrate
from ballast.sessions.store import (
    AppendResult,
    ClaimedJob,
    FailureHook,
    JobRecord,
    JobStart,
    Lease,
    SessionLimits,
    SessionRecord,
)
from ballast.telemetry import Telemetry

__all__ = ["SQLiteStore", "WriterStats"]

T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 5_000

Conn = sqlite3.Connection


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _close(conn: Conn) -> None:
    conn.close()


class SQLiteStore:
    """The :class:`~ballast.sessions.store.Store` port on a SQLite file in WAL mode.

    ``durability="full"`` fsyncs every commit (a returned write survives power loss);
    ``"normal"`` fsyncs only at checkpoints (a returned write survives a crash of the
    process, not of the machine). ``on_failure`` is called on the event loop for every
    batch of mutations that failed for a reason other than the client's; an exception
    it raises is logged and otherwise ignored.
    """

    def __init__(
        self,
        path: str | Path,
        durability: Literal["full", "normal"] = "full",
        on_failure: FailureHook | None = None,
        *,
        read_workers: int = 2,
        limits: SessionLimits | None = None,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        telemetry: Telemetry | None = None,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        if read_workers < 1:
            raise ValueError("read_workers must be at least 1")
        self.path = Path(path)
        self.durability = durability
        self.limits = limits or SessionLimits()
        self.busy_timeout_ms = busy_timeout_ms
        self._read_workers = read_workers
        self._writes: WriteQueue[Conn] = WriteQueue(on_failure, CommitMetrics(telemetry))
        self._readers: ReadPool[Conn] | None = None
        self._opened = False

    @property
    def stats(self) -> WriterStats:
        return self._writes.stats

    @property
    def on_failure(self) -> FailureHook | None:
        return self._writes.on_failure

    @on_failure.setter
    def on_failure(self, hook: FailureHook | None) -> None:
        self._writes.on_failure = hook

    @property
    def failure(self) -> str | None:
        return self._writes.failure

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._opened:
            return
        if self._writes.closed:
            raise StoreError(internal="A closed SQLiteStore cannot be reopened; make a new one.")
        conn = await asyncio.to_thread(self._prepare)
        self._readers = ReadPool(partial(self._connect, readonly=True), _close, self._read_workers)
        self._readers.start()
        self._writes.start(conn, self._commit_group, _close)
        self._opened = True

    async def close(self) -> None:
        if self._writes.closed and (self._readers is None or self._readers.closed):
            return
        await asyncio.to_thread(self._writes.stop)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.stop)

    def _connect(self, *, readonly: bool) -> Conn:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,  # transactions are explicit
            check_same_thread=False,
            cached_statements=64,
            timeout=self.busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _prepare(self) -> Conn:
        """Make the file, its directories and the schema; return the writer's connection."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect(readonly=False)
        try:
            mode = self._switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(internal=f"{self.path}: could not switch to WAL (got {mode!r}).")
            sync = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA cache_size = -32768")
            migrate(conn, self.path)
        except sqlite3.Error as exc:  # locked past the timeout, not a database, ...
            conn.close()
            raise StoreError(internal=f"{self.path}: cannot be opened ({exc})") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _switch_to_wal(self, conn: Conn) -> str:
        """``PRAGMA journal_mode = WAL``, waiting out another connection's transaction.

        Switching the journal mode needs the file to itself, and SQLite answers a
        connection that would have to wait for it with SQLITE_BUSY at once, without the
        busy timeout: two processes opening a new file together (``--workers N``) meet
        here while one of them creates the schema. Retried until the busy timeout.
        """
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        pause = 0.005
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    # ------------------------------------------------------------------ reads

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._readers is None:
            raise StoreError(internal="SQLiteStore is not open; call open() first.")
        return await self._readers.submit(partial(fn, *args))

    async def get_session(self, tenant: str, session_id: str) -> SessionRecord | None:
        return await self._read(ops.read_session, tenant, session_id)

    async def get_session_with_job(
        self, tenant: str, session_id: str
    ) -> tuple[SessionRecord | None, JobRecord | None]:
        # One hop to a reader thread instead of two: the hop costs more than the reads.
        return await self._read(ops.read_session_with_job, tenant, session_id)

    async def list_sessions(self, tenant: str, after: str | None,
                            limit: int) -> list[tuple[SessionRecord, JobRecord | None]]:
        if limit <= 0:
            return []
        return await self._read(ops.read_sessions, tenant, after, limit)

    async def list_mutations(self, tenant: str, session_id: str, after: int,
                             limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return await self._read(ops.read_page, tenant, session_id, after, limit)

    async def get_job(self, tenant: str, session_id: str) -> JobRecord | None:
        return await self._read(ops.read_job, tenant, session_id)

    async def get_report(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        return await self._read(ops.read_report, tenant, session_id)

    def iter_mutations(self, tenant: str, session_id: str,
                       batch: int = 5000) -> Generator[dict[str, Any], None, None]:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        conn = self._connect(readonly=True)
        try:
            pk = ops.session_pk(tenant, session_id, conn)
            if pk is None:
                return
            after = 0
            while True:
                rows = conn.execute(ops.SELECT_PAGE, (pk, after, batch)).fetchall()
                for seq, mutation_id, type_, payload in rows:
                    yield ops.mutation_dict(seq, mutation_id, type_, payload)
                if len(rows) < batch:
                    return
                after = rows[-1][0]
        finally:
            conn.close()

    # ------------------------------------------------------------------ writes

    def _submit(self, key: Any, apply: Callable[[Conn], T], *, session_id: str = "",
                mutations: list[dict[str, Any]] | None = None) -> asyncio.Future[T]:
        return self._writes.submit(key, apply, session_id=session_id, mutations=mutations)

    async def create_session(self, tenant: str, session_id: str, title: str | None,
                             participants: list[str]) -> SessionRecord:
        record = SessionRecord(session_id, "open", title, list(participants), 0, 0, {}, _now(), tenant)
        return await self._submit((tenant, session_id), partial(ops.apply_create, record, self.limits))

    async def append(self, tenant: str, session_id: str, mutations: list[dict[str, Any]]) -> AppendResult:
        apply = partial(ops.apply_append, tenant, session_id, mutations, self.limits)
        return await self._submit((tenant, session_id), apply, session_id=session_id, mutations=mutations)

    async def start_job(self, tenant: str, session_id: str, owner: str, lease_s: float,
                        progress: dict[str, Any]) -> JobStart:
        apply = partial(ops.apply_start, tenant, session_id, owner, lease_s, progress)
        return await self._submit((tenant, session_id), apply)

    async def save_progress(self, lease: Lease, progress: dict[str, Any], lease_s: float) -> None:
        apply = partial(ops.apply_progress, lease, progress, lease_s)
        await self._submit((lease.tenant, lease.session_id), apply)

    async def renew_lease(self, lease: Lease, lease_s: float) -> None:
        apply = partial(ops.apply_progress, lease, None, lease_s)
        await self._submit((lease.tenant, lease.session_id), apply)

    async def finish_job(self, lease: Lease, state: str, progress: dict[str, Any],
                         report: dict[str, Any] | None) -> None:
        if state not in END_STATES:
            raise ValueError(f"a job ends succeeded, failed or timed_out, not {state!r}")
        apply = partial(ops.apply_finish, lease, state, progress, report)
        await self._submit((lease.tenant, lease.session_id), apply)

    async def release_job(self, lease: Lease) -> None:
        await self._submit((lease.tenant, lease.session_id), partial(ops.apply_release, lease))

    async def claim_expired_jobs(self, owner: str, lease_s: float, limit: int = 16) -> list[ClaimedJob]:
        return await self._submit(None, partial(ops.apply_claim, owner, lease_s, limit))

    async def pending(self, tenant: str, session_id: str) -> int:
        return self._writes.pending((tenant, session_id))

    async def drain(self, tenant: str, session_id: str) -> None:
        await self._writes.drain((tenant, session_id))

    # ------------------------------------------------------------------ one group

    def _commit_group(self, conn: Conn, group: list[Request[Conn]]) -> list[Outcome]:
        """Apply every request of the group in one transaction, each in its own savepoint.

        If a failure ends the whole transaction (``RAISE(ROLLBACK)`` in a trigger, a
        full disk), the failed request is set aside and the rest are applied again in a
        new transaction; their results depend only on the database, so nothing changes
        for their callers.
        """
        failed: dict[int, BaseException] = {}
        results: dict[int, Any] = {}
        while len(failed) < len(group):
            results.clear()
            restart = False
            # A lone request needs no savepoint: the transaction is its savepoint.
            savepoints = len(group) - len(failed) > 1
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                return [Outcome(r, error=failed.get(i, exc)) for i, r in enumerate(group)]
            for i, request in enumerate(group):
                if i in failed:
                    continue
                try:
                    if savepoints:
                        conn.execute("SAVEPOINT request")
                    results[i] = request.apply(conn)
                    if savepoints:
                        conn.execute("RELEASE request")
                except Exception as exc:  # any failure fails this request alone
                    failed[i] = exc
                    if not savepoints or not _rollback_to_savepoint(conn):
                        _rollback(conn)
                        restart = True
                        break
            if restart:
                continue
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                return [Outcome(r, error=failed.get(i, exc)) for i, r in enumerate(group)]
            return [
                Outcome(r, error=failed[i]) if i in failed else Outcome(r, result=results[i])
                for i, r in enumerate(group)
            ]
        return [Outcome(r, error=failed[i]) for i, r in enumerate(group)]


def _rollback_to_savepoint(conn: Conn) -> bool:
    """Undo the failed request alone; False if that was not possible."""
    if not conn.in_transaction:
        return False
    try:
        conn.execute("ROLLBACK TO request")
        conn.execute("RELEASE request")
    except sqlite3.Error:
        return False
    return True


def _rollback(conn: Conn) -> None:
    """Undo the whole transaction, if one is still open."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
