"""The embedded SQLite adapter of the store port, with group commit.

A durable write costs an fsync, and an fsync costs the same whether it covers one
mutation or thousands. So every write (appends, state changes, job and report saves,
session creation) is queued to ONE writer thread with its own connection; it takes
whatever has queued up, applies it in one transaction, commits once and then answers
every caller. Under load, many callers share each fsync; when idle, a lone write is
committed at once.

Each request of a group runs inside its own SAVEPOINT, so a request that fails (a
constraint, a trigger, a bug) is rolled back alone, its caller gets a
:class:`StoreError`, and the rest of its group still commits. The queue keeps going
after a failure.

Reads use a small pool of separate connections on their own threads: in WAL mode they
read the last committed state while the writer writes. No SQLite call ever runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import sqlite3
import threading
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import orjson
import structlog

from ballast.errors import BallastError, ClientError, StoreError
from ballast.sessions.store import (
    INTERRUPTED_JOB_ERROR,
    SESSION_STATES,
    SPEAKERS_RESOLVED,
    Accepted,
    AppendResult,
    FailureHook,
    SessionRecord,
    session_exists,
    session_not_found,
    session_not_open,
)
from ballast.telemetry import Telemetry

__all__ = ["SQLiteStore", "WriterStats"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCHEMA_VERSION: Final = 1

#: Bounds of one group transaction: it must stay short enough that the first caller in
#: it is not kept waiting behind an unbounded backlog.
MAX_GROUP_MUTATIONS: Final = 20_000
MAX_GROUP_REQUESTS: Final = 512

#: Reads one reader thread answers with one wake-up of the event loop.
MAX_READ_BATCH: Final = 64

BUSY_TIMEOUT_MS: Final = 5_000

_SCHEMA: Final = """
CREATE TABLE sessions (
    session_id     TEXT PRIMARY KEY,
    state          TEXT NOT NULL
                   CHECK (state IN ('open', 'finalizing', 'finalized', 'failed')),
    title          TEXT,
    participants   TEXT NOT NULL,
    speakers       TEXT NOT NULL,
    mutation_count INTEGER NOT NULL DEFAULT 0,
    last_seq       INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL
);
CREATE TABLE mutations (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    mutation_id TEXT,
    type        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX mutations_by_id ON mutations (session_id, mutation_id)
    WHERE mutation_id IS NOT NULL;
CREATE TABLE jobs (
    session_id TEXT PRIMARY KEY,
    body       TEXT NOT NULL
);
CREATE TABLE reports (
    session_id TEXT PRIMARY KEY,
    body       TEXT NOT NULL
);
"""

_SELECT_SESSION: Final = (
    "SELECT session_id, state, title, participants, mutation_count, last_seq, speakers,"
    " created_at FROM sessions WHERE session_id = ?"
)
_SELECT_FOR_APPEND: Final = (
    "SELECT state, participants, speakers, last_seq FROM sessions WHERE session_id = ?"
)
# One statement whatever the batch size (an IN list of ? would compile one per size);
# each id is one lookup in the partial unique index (a plain join would let the planner
# scan every id of the session instead).
_SELECT_KNOWN_IDS: Final = (
    "SELECT mutation_id, seq FROM mutations"
    " WHERE session_id = ? AND mutation_id IN (SELECT value FROM json_each(?))"
)
_INSERT_MUTATION: Final = (
    "INSERT INTO mutations (session_id, seq, mutation_id, type, payload) VALUES (?, ?, ?, ?, ?)"
)
_SELECT_PAGE: Final = (
    "SELECT seq, mutation_id, type, payload FROM mutations"
    " WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)
_UPSERT_BODY: Final = {
    table: f"INSERT INTO {table} (session_id, body) VALUES (?, ?)"
    " ON CONFLICT (session_id) DO UPDATE SET body = excluded.body"
    for table in ("jobs", "reports")
}
_SELECT_BODY: Final = {
    table: f"SELECT body FROM {table} WHERE session_id = ?" for table in ("jobs", "reports")
}

_dumps = orjson.dumps
_loads = orjson.loads


def _json(value: Any) -> str:
    return _dumps(value).decode()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _mutation_dict(seq: int, mutation_id: str | None, type_: str, payload: str) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": seq, "id": mutation_id, "type": type_}
    out.update(_loads(payload))
    return out


def _new_in(result: Any) -> int:
    """Mutations a committed append added (repeated ids are not new)."""
    if isinstance(result, AppendResult):
        return sum(1 for a in result.accepted if not a.duplicate)
    return 0


def _store_error(exc: BaseException) -> StoreError:
    err = StoreError(internal=f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


@dataclass(slots=True)
class WriterStats:
    """Counters of the writer, for benchmarks and tests (read them on the event loop)."""

    groups: int = 0
    requests: int = 0
    mutations: int = 0
    failed_requests: int = 0


@dataclass(slots=True, eq=False)
class _Request:
    """One queued write: what to apply, and whom to answer."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    session_id: str
    apply: Callable[[sqlite3.Connection], Any]
    mutations: list[dict[str, Any]] | None = None  # set for appends only
    weight: int = 1
    # The caller's context (appends only): a failure is reported in it, so its log
    # lines carry the request id of the request that sent the batch.
    context: contextvars.Context | None = None


@dataclass(slots=True, eq=False)
class _Outcome:
    request: _Request
    result: Any = None
    error: BaseException | None = None


_STOP: Final = object()


@dataclass(slots=True, eq=False)
class _Read:
    """One queued read: what to run on a read connection, and whom to answer."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    run: Callable[[sqlite3.Connection], Any]


_ReadAnswer = tuple[_Read, Any, BaseException | None]


class _ReadPool:
    """A few reader threads, each with its own connection, sharing one queue.

    A thread hop costs more than the SQLite work of a point read, so a reader takes
    every read that is already waiting (up to :data:`MAX_READ_BATCH`) and answers all
    of them with one wake-up of the event loop.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], workers: int) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Read | object] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"ballast-store-read-{i}", daemon=True)
            for i in range(workers)
        ]
        self.closed = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, run: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self.closed:
            raise StoreError(internal="SQLiteStore is closed; the read was not run.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Read(loop, future, run))
        return future

    def stop(self) -> None:
        """Stop and join every reader (blocking); reads already queued are answered."""
        self.closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                batch, stop = [item], False
                while len(batch) < MAX_READ_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                answers: dict[asyncio.AbstractEventLoop, list[_ReadAnswer]] = {}
                for read in batch:
                    assert isinstance(read, _Read)
                    answer: _ReadAnswer
                    try:
                        if conn is None:
                            conn = self._connect()
                        answer = (read, read.run(conn), None)
                    except Exception as exc:  # the caller gets it; the reader goes on
                        answer = (read, None, exc)
                    answers.setdefault(read.loop, []).append(answer)
                for loop, results in answers.items():
                    try:
                        loop.call_soon_threadsafe(_answer_reads, results)
                    except RuntimeError:  # the loop is closed: nobody is waiting any more
                        pass
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()


def _answer_reads(results: list[_ReadAnswer]) -> None:
    for read, result, error in results:
        if read.future.done():
            continue
        if error is None:
            read.future.set_result(result)
        elif isinstance(error, BallastError):
            read.future.set_exception(error)
        else:
            read.future.set_exception(_store_error(error))


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
        telemetry: Telemetry | None = None,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        if read_workers < 1:
            raise ValueError("read_workers must be at least 1")
        self.path = Path(path)
        self.durability = durability
        self.on_failure = on_failure
        self.stats = WriterStats()
        tel = telemetry or Telemetry()
        self._committed_total = tel.counter("ballast_mutations_committed_total")
        self._batch_size = tel.histogram("ballast_commit_batch_size")
        self._read_workers = read_workers
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: _ReadPool | None = None
        self._closed = False
        self._pending: dict[str, int] = {}
        self._drain_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._writer is not None:
            return
        if self._closed:
            raise StoreError(internal="A closed SQLiteStore cannot be reopened; make a new one.")
        conn = await asyncio.to_thread(self._prepare)
        self._readers = _ReadPool(partial(self._connect, readonly=True), self._read_workers)
        self._readers.start()
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="ballast-store-writer", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.stop)

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,  # transactions are explicit
            check_same_thread=False,
            cached_statements=64,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _prepare(self) -> sqlite3.Connection:
        """Make the file, its directories and the schema; return the writer's connection."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect(readonly=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(internal=f"{self.path}: could not switch to WAL (got {mode!r}).")
            sync = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA cache_size = -32768")
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # One statement at a time: executescript() would commit the open transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    internal=(
                        f"{self.path} has schema version {version}, newer than the"
                        f" {SCHEMA_VERSION} this server knows; upgrade the server or point"
                        " storage.path elsewhere."
                    )
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    # ------------------------------------------------------------------ reads

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._readers is None:
            raise StoreError(internal="SQLiteStore is not open; call open() first.")
        return await self._readers.submit(partial(fn, *args))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._read(_read_session, session_id)

    async def get_session_with_job(
        self, session_id: str
    ) -> tuple[SessionRecord | None, dict[str, Any] | None]:
        # One hop to a reader thread instead of two: the hop costs more than the reads.
        return await self._read(_read_session_with_job, session_id)

    async def list_mutations(self, session_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return await self._read(_read_page, session_id, after, limit)

    async def get_job(self, session_id: str) -> dict[str, Any] | None:
        return await self._read(_read_body, "jobs", session_id)

    async def get_report(self, session_id: str) -> dict[str, Any] | None:
        return await self._read(_read_body, "reports", session_id)

    def iter_mutations(self, session_id: str, batch: int = 5000) -> Generator[dict[str, Any], None, None]:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        conn = self._connect(readonly=True)
        try:
            after = 0
            while True:
                rows = conn.execute(_SELECT_PAGE, (session_id, after, batch)).fetchall()
                for seq, mutation_id, type_, payload in rows:
                    yield _mutation_dict(seq, mutation_id, type_, payload)
                if len(rows) < batch:
                    return
                after = rows[-1][0]
        finally:
            conn.close()

    # ------------------------------------------------------------------ writes

    def _submit(
        self,
        session_id: str,
        apply: Callable[[sqlite3.Connection], T],
        mutations: list[dict[str, Any]] | None = None,
    ) -> asyncio.Future[T]:
        """Queue a write. Synchronous on purpose: arrival order is call order."""
        if self._closed or self._writer is None:
            state = "closed" if self._closed else "not open"
            raise StoreError(internal=f"SQLiteStore is {state}; the write was not queued.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        weight = len(mutations) if mutations is not None else 1
        context = contextvars.copy_context() if mutations is not None else None
        self._queue.put(_Request(loop, future, session_id, apply, mutations, max(weight, 1), context))
        if mutations is not None:
            self._pending[session_id] = self._pending.get(session_id, 0) + 1
        return future

    async def create_session(
        self, session_id: str, title: str | None, participants: list[str]
    ) -> SessionRecord:
        record = SessionRecord(
            session_id=session_id,
            state="open",
            title=title,
            participants=list(dict.fromkeys(participants)),
            mutation_count=0,
            last_seq=0,
            speakers={},
            created_at=_now(),
        )
        return await self._submit(session_id, partial(_apply_create, record))

    async def append(self, session_id: str, mutations: list[dict[str, Any]]) -> AppendResult:
        apply = partial(_apply_append, session_id, mutations)
        return await self._submit(session_id, apply, mutations)

    async def set_state(self, session_id: str, state: str, *, expect: Collection[str] | None = None) -> bool:
        if state not in SESSION_STATES:
            raise ValueError(f"state must be one of {SESSION_STATES}, not {state!r}")
        allowed = None if expect is None else frozenset(expect)
        return await self._submit(session_id, partial(_apply_state, session_id, state, allowed))

    async def save_job(self, session_id: str, job: dict[str, Any]) -> None:
        await self._submit(session_id, partial(_apply_body, "jobs", session_id, _json(job)))

    async def save_report(self, session_id: str, report: dict[str, Any]) -> None:
        await self._submit(session_id, partial(_apply_body, "reports", session_id, _json(report)))

    async def recover(self) -> int:
        return await self._submit("", _apply_recover)

    async def pending(self, session_id: str) -> int:
        return self._pending.get(session_id, 0)

    async def drain(self, session_id: str) -> None:
        if not self._pending.get(session_id):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.setdefault(session_id, []).append(waiter)
        await waiter

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        carry: _Request | None = None
        try:
            while True:
                first = carry if carry is not None else self._queue.get()
                carry = None
                if first is _STOP:
                    break
                assert isinstance(first, _Request)
                group, weight, stop = [first], first.weight, False
                while len(group) < MAX_GROUP_REQUESTS and weight < MAX_GROUP_MUTATIONS:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    assert isinstance(item, _Request)
                    if weight + item.weight > MAX_GROUP_MUTATIONS:
                        carry = item
                        break
                    group.append(item)
                    weight += item.weight
                try:
                    outcomes = self._commit_group(conn, group)
                except Exception as exc:  # the writer must outlive any one group
                    outcomes = [_Outcome(r, error=exc) for r in group]
                self._settle(outcomes)
                if stop:
                    break
        finally:
            conn.close()
            # Only a write racing close() from another thread can be left; answer it.
            left: list[_Outcome] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Request):
                    closed = StoreError(internal="SQLiteStore was closed before the write ran.")
                    left.append(_Outcome(item, error=closed))
            if left:
                self._settle(left)

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Request]) -> list[_Outcome]:
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
                return [_Outcome(r, error=failed.get(i, exc)) for i, r in enumerate(group)]
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
                return [_Outcome(r, error=failed.get(i, exc)) for i, r in enumerate(group)]
            return [
                _Outcome(r, error=failed[i]) if i in failed else _Outcome(r, result=results[i])
                for i, r in enumerate(group)
            ]
        return [_Outcome(r, error=failed[i]) for i, r in enumerate(group)]

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """Hand the outcomes to the event loop(s) that are waiting for them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.request.loop, []).append(outcome)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._resolve, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        """Runs on the event loop: answer each caller, notify failures, wake drainers."""
        stats = self.stats
        stats.groups += 1
        drained: list[str] = []
        committed = 0
        for outcome in outcomes:
            request, error = outcome.request, outcome.error
            stats.requests += 1
            if request.mutations is not None:
                sid = request.session_id
                left = self._pending.get(sid, 1) - 1
                if left > 0:
                    self._pending[sid] = left
                else:
                    self._pending.pop(sid, None)
                    drained.append(sid)
            future = request.future
            if error is None:
                if request.mutations is not None:
                    stats.mutations += len(request.mutations)
                    committed += _new_in(outcome.result)
                if not future.done():
                    future.set_result(outcome.result)
                continue
            if isinstance(error, ClientError):
                exc: BaseException = error
            else:
                stats.failed_requests += 1
                exc = error if isinstance(error, StoreError) else _store_error(error)
                if request.mutations is not None:
                    if request.context is None:
                        self._notify_failure(request.session_id, request.mutations, error)
                    else:
                        request.context.run(self._notify_failure, request.session_id,
                                            request.mutations, error)
            if not future.done():
                future.set_exception(exc)
        if committed:
            self._committed_total.inc(amount=committed)
            self._batch_size.observe(committed)
        for sid in drained:
            for waiter in self._drain_waiters.pop(sid, []):
                if not waiter.done():
                    waiter.set_result(None)

    def _notify_failure(self, session_id: str, mutations: list[dict[str, Any]], error: BaseException) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(session_id, mutations, error)
        except Exception as hook_error:  # a broken hook must not stop the queue
            log.error(
                "store.failure_hook_failed",
                session_id=session_id,
                error_type=type(hook_error).__name__,
                error=str(hook_error),
            )


# ---------------------------------------------------------------------- write requests
# Each runs on the writer thread inside the group transaction and its own savepoint.


def _rollback_to_savepoint(conn: sqlite3.Connection) -> bool:
    """Undo the failed request alone; False if that was not possible."""
    if not conn.in_transaction:
        return False
    try:
        conn.execute("ROLLBACK TO request")
        conn.execute("RELEASE request")
    except sqlite3.Error:
        return False
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the whole transaction, if one is still open."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _apply_create(record: SessionRecord, conn: sqlite3.Connection) -> SessionRecord:
    try:
        conn.execute(
            "INSERT INTO sessions (session_id, state, title, participants, speakers,"
            " mutation_count, last_seq, created_at) VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
            (
                record.session_id,
                record.state,
                record.title,
                _json(record.participants),
                _json(record.speakers),
                record.created_at,
            ),
        )
    except sqlite3.IntegrityError as exc:
        exists = conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (record.session_id,)).fetchone()
        if exists is not None:
            raise session_exists(record.session_id) from exc
        raise
    return record


def _apply_append(session_id: str, mutations: list[dict[str, Any]], conn: sqlite3.Connection) -> AppendResult:
    row = conn.execute(_SELECT_FOR_APPEND, (session_id,)).fetchone()
    if row is None:
        raise session_not_found(session_id)
    state, participants_json, speakers_json, last_seq = row
    if state != "open":
        raise session_not_open(session_id, state)

    accepted, rows, seq = _number(session_id, mutations, last_seq, {})
    if not any(m.get("id") is not None for m in mutations):
        conn.executemany(_INSERT_MUTATION, rows)
    else:
        # Repeats are rare (a client retrying), so first assume every id is new and let
        # the unique index say otherwise, rather than look each id up before inserting.
        # One row needs no savepoint: a failed statement leaves nothing behind.
        several = len(rows) > 1
        if several:
            conn.execute("SAVEPOINT fresh_ids")
        try:
            conn.executemany(_INSERT_MUTATION, rows)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname != "SQLITE_CONSTRAINT_UNIQUE":
                raise
            if several:
                conn.execute("ROLLBACK TO fresh_ids")
                conn.execute("RELEASE fresh_ids")
            ids = [m["id"] for m in mutations if m.get("id") is not None]
            known = dict(conn.execute(_SELECT_KNOWN_IDS, (session_id, _json(ids))).fetchall())
            accepted, rows, seq = _number(session_id, mutations, last_seq, known)
            conn.executemany(_INSERT_MUTATION, rows)
        else:
            if several:
                conn.execute("RELEASE fresh_ids")

    if rows:
        participants: list[str] | None = None
        speakers: dict[str, str] | None = None
        for mutation, outcome in zip(mutations, accepted, strict=True):
            if outcome.duplicate:
                continue
            type_ = mutation["type"]
            if type_ == "participant_joined":
                if participants is None:
                    participants = _loads(participants_json)
                if mutation["name"] not in participants:
                    participants.append(mutation["name"])
            elif type_ == "speaker_renamed":
                if speakers is None:
                    speakers = _loads(speakers_json)
                speakers[mutation["speaker"]] = mutation["name"]
            elif type_ == SPEAKERS_RESOLVED:
                if speakers is None:
                    speakers = _loads(speakers_json)
                speakers.update(mutation["mapping"])
        conn.execute(
            "UPDATE sessions SET mutation_count = mutation_count + ?, last_seq = ?,"
            " participants = coalesce(?, participants), speakers = coalesce(?, speakers)"
            " WHERE session_id = ?",
            (
                len(rows),
                seq,
                None if participants is None else _json(participants),
                None if speakers is None else _json(speakers),
                session_id,
            ),
        )
    return AppendResult(accepted, seq)


def _number(
    session_id: str, mutations: list[dict[str, Any]], last_seq: int, known: dict[str, int]
) -> tuple[list[Accepted], list[tuple[str, int, str | None, str, str]], int]:
    """Give each new mutation the next seq; a known id (or one repeated) keeps its seq.

    ``known`` is filled in with the ids of this batch as they are numbered.
    """
    accepted: list[Accepted] = []
    rows: list[tuple[str, int, str | None, str, str]] = []
    seq = last_seq
    dumps = _dumps
    for mutation in mutations:
        mutation_id = mutation.get("id")
        if mutation_id is not None:
            original = known.get(mutation_id)
            if original is not None:
                accepted.append(Accepted(mutation_id, original, True))
                continue
            known[mutation_id] = seq + 1
        seq += 1
        payload = mutation.copy()
        payload.pop("id", None)
        type_ = payload.pop("type")
        rows.append((session_id, seq, mutation_id, type_, dumps(payload).decode()))
        accepted.append(Accepted(mutation_id, seq, False))
    return accepted, rows, seq


def _apply_state(
    session_id: str, state: str, expect: frozenset[str] | None, conn: sqlite3.Connection
) -> bool:
    row = conn.execute("SELECT state FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        raise session_not_found(session_id)
    if expect is not None and row[0] not in expect:
        return False
    if row[0] != state:
        conn.execute("UPDATE sessions SET state = ? WHERE session_id = ?", (state, session_id))
    return True


def _apply_body(table: str, session_id: str, body: str, conn: sqlite3.Connection) -> None:
    exists = conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if exists is None:
        raise session_not_found(session_id)
    conn.execute(_UPSERT_BODY[table], (session_id, body))


def _apply_recover(conn: sqlite3.Connection) -> int:
    running = conn.execute(
        "SELECT session_id, body FROM jobs WHERE json_extract(body, '$.state') = 'running'"
    ).fetchall()
    for session_id, body in running:
        job = _loads(body)
        job["state"] = "failed"
        job["error"] = dict(INTERRUPTED_JOB_ERROR)
        for stage in job.get("stages") or []:
            if isinstance(stage, dict) and stage.get("state") == "running":
                stage["state"] = "failed"
        conn.execute("UPDATE jobs SET body = ? WHERE session_id = ?", (_json(job), session_id))
    conn.execute("UPDATE sessions SET state = 'failed' WHERE state = 'finalizing'")
    return len(running)


# ---------------------------------------------------------------------- reads
# Each runs on a read-pool thread with that thread's connection.


def _read_session(session_id: str, conn: sqlite3.Connection) -> SessionRecord | None:
    row = conn.execute(_SELECT_SESSION, (session_id,)).fetchone()
    if row is None:
        return None
    sid, state, title, participants, mutation_count, last_seq, speakers, created_at = row
    return SessionRecord(
        sid,
        state,
        title,
        _loads(participants),
        mutation_count,
        last_seq,
        _loads(speakers),
        created_at,
    )


def _read_session_with_job(
    session_id: str, conn: sqlite3.Connection
) -> tuple[SessionRecord | None, dict[str, Any] | None]:
    # One read transaction, so the session and its job are from the same commit.
    conn.execute("BEGIN")
    try:
        record = _read_session(session_id, conn)
        job = None if record is None else _read_body("jobs", session_id, conn)
    finally:
        conn.execute("COMMIT")
    return record, job


def _read_page(session_id: str, after: int, limit: int, conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(_SELECT_PAGE, (session_id, after, limit)).fetchall()
    return [_mutation_dict(*row) for row in rows]


def _read_body(table: str, session_id: str, conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute(_SELECT_BODY[table], (session_id,)).fetchone()
    if row is None:
        return None
    body: dict[str, Any] = _loads(row[0])
    return body
