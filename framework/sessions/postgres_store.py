"""The PostgreSQL adapter of the store port: several server processes, one database.

Seq numbers. Each session row is its own counter: an append transaction locks the rows
of the sessions it writes (``SELECT ... FOR UPDATE``, in ``sid`` order so two
transactions never wait on each other in a cycle), reads ``last_seq``, numbers its
batch, inserts the rows and moves ``last_seq`` on before it commits. The row lock
serializes appenders of one session in every process on every host and is released
only by COMMIT or ROLLBACK, so a seq is handed out only by a transaction that commits
it: no gaps (a sequence object would leave one on every rollback), no duplicates, and
appends to different sessions never wait for each other. A row lock rather than an
advisory lock because the counter it protects is in that very row: no code path can
forget to take it, and it needs no separate key space.

Idempotent ids. Repeats are rare (a client retrying), so a batch is first numbered on
the guess that all its ids are new, and inserted with ``ON CONFLICT DO NOTHING`` on the
partial unique index of ``(sid, mutation_id)``. If the insert skipped a row, an id was
already stored: the transaction is rolled back and run again with the batch's stored
ids read first under the session's lock, so a repeat keeps its original seq and is
never stored twice. The unique index is the backstop of both paths.

Batching. Appends are queued per process; a few flusher tasks each take everything
queued (all sessions, up to a bound), and apply it in ONE transaction of at most five
round trips whatever its size: BEGIN, lock-and-read, the participant and label rows
the batch names that exist (skipped when it names none), one statement that writes
every table (``unnest`` of arrays), COMMIT. A session being flushed is not taken by
another flusher, so the appends of one process reach the database in call order. A
shared transaction takes its session locks with ``SKIP LOCKED`` and leaves the sessions
another process holds to one transaction right after that waits for them, so processes
never queue behind each other's whole lock sets. If a shared transaction fails for a
reason that is not the caller's, each of its appends is run again in its own
transaction, so one bad batch fails alone; one whose COMMIT got no answer is not run
again (it may be stored) and its callers get an error.

Durability. Every connection runs with ``synchronous_commit = on``: an append is
answered only after COMMIT returned, which means the WAL is flushed on the primary (and
on synchronous standbys, if the operator configured any).

Finalize jobs are leased rows (see :mod:`ballast.sessions.jobrecord` for the state
machine every adapter shares). Times of leases are the database's clock, so several
hosts with skewed clocks agree on when a lease expires.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import asyncpg
import orjson
import structlog

from ballast.errors import ClientError, StoreError
from ballast.sessions import ingest, jobrecord
from ballast.sessions import postgres_sql as sql
from ballast.sessions.commit_metrics import CommitMetrics
from ballast.sessions.postgres_schema import migrate
from ballast.sessions.store import (
    AppendResult,
    ClaimedJob,
    FailureHook,
    JobRecord,
    JobStart,
    Lease,
    LeaseLost,
    SessionLimits,
    SessionRecord,
    session_exists,
    session_limit,
    session_not_found,
    session_not_open,
    unknown_cursor,
)
from ballast.telemetry import Telemetry

__all__ = ["PostgresStore"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Bounds of one shared append transaction, so the first caller in it is not kept
#: waiting behind an unbounded backlog.
MAX_FLUSH_MUTATIONS: Final = 20_000
MAX_FLUSH_REQUESTS: Final = 512

#: No statement waits longer than this on the database (a lost connection, a stuck
#: lock): the caller gets a StoreError instead of waiting forever.
COMMAND_TIMEOUT_S: Final = 60.0

async def _nothing_to_reset(conn: Any) -> None:
    """The pool's reset on release, made a no-op: this adapter leaves no session state.

    asyncpg's default sends one more query per release (unlock advisory locks, close
    cursors, unlisten, reset settings), doubling the round trips of a point read. Here
    locks are transaction-scoped, cursors live inside transactions, nothing listens
    and nothing is SET after connect; asyncpg still ends any open transaction itself.
    """


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _store_error(exc: BaseException) -> StoreError:
    err = StoreError(internal=f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _record(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"], state=row["state"], title=row["title"],
        participants=list(row["participants"]), mutation_count=row["mutation_count"],
        last_seq=row["last_seq"], speakers={} if row["speakers"] is None else orjson.loads(row["speakers"]),
        created_at=row["created_at"], tenant=row["tenant"])


def _job(row: Any) -> JobRecord | None:
    if row is None or row["job_state"] is None:
        return None
    return jobrecord.job_from_row(tuple(row[f"job_{c}"] for c in jobrecord.JOB_COLUMNS))


def _mutation(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": row[0], "id": row[1], "type": row[2]}
    out.update(orjson.loads(row[3]))
    return out


@dataclass(slots=True, eq=False)
class _Append:
    """One queued append: the batch and the caller waiting for its outcome."""

    key: tuple[str, str]
    mutations: list[dict[str, Any]]
    future: asyncio.Future[AppendResult]
    context: contextvars.Context


_Outcome = tuple[_Append, AppendResult | None, BaseException | None]


#: SQLSTATE classes of errors that can end a connection in the middle of a COMMIT
#: (connection exception, operator intervention such as an administrator's terminate,
#: system and internal errors): the COMMIT may or may not have been applied.
_UNKNOWN_OUTCOME_CLASSES: Final = frozenset({"08", "57", "58", "XX"})


def _rolled_back(exc: BaseException) -> bool:
    """True if a failed COMMIT certainly did not commit (the server refused it)."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False  # no answer: a lost connection, a timeout
    return str(getattr(exc, "sqlstate", ""))[:2] not in _UNKNOWN_OUTCOME_CLASSES


class _IdsAlreadyStored(Exception):
    """The optimistic numbering met an id that is already stored: look ids up, again."""


class _CommitUnknown(Exception):
    """COMMIT failed without an answer (the connection died): the outcome is unknown."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _SessionState:
    """A locked session as a flush sees it, moved on by each append applied to it."""

    sid: int
    state: str
    last_seq: int
    mutation_count: int
    participant_count: int
    label_count: int
    known_ids: dict[str, int] = field(default_factory=dict)
    participants: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Writes:
    """The rows a flush writes, as the column arrays of its one write statement."""

    m: tuple[list[int], list[int], list[str | None], list[str], list[str]] = field(
        default_factory=lambda: ([], [], [], [], []))
    p: tuple[list[int], list[int], list[str]] = field(default_factory=lambda: ([], [], []))
    names: dict[tuple[int, str], str | None] = field(default_factory=dict)
    sessions: dict[int, _SessionState] = field(default_factory=dict)

    def args(self) -> list[Any]:
        labels = list(self.names.items())
        s = list(self.sessions.values())
        return [*self.m, *self.p,
                [k[0] for k, _ in labels], [k[1] for k, _ in labels], [v for _, v in labels],
                [x.sid for x in s], [x.mutation_count for x in s], [x.last_seq for x in s],
                [x.participant_count for x in s], [x.label_count for x in s]]


class PostgresStore:
    """The store port on PostgreSQL through an asyncpg pool (see the module docstring)."""

    def __init__(self, url: str, *, pool_size: int = 10, on_failure: FailureHook | None = None,
                 limits: SessionLimits | None = None, flushers: int | None = None,
                 connect_timeout_s: float = 10.0, telemetry: Telemetry | None = None) -> None:
        if pool_size < 2:
            raise ValueError("pool_size must be at least 2 (appends and reads share the pool)")
        self._url = url
        self.pool_size = pool_size
        self.on_failure = on_failure
        self.limits = limits or SessionLimits()
        self._flushers = flushers or max(1, min(4, pool_size // 2))
        self._connect_timeout_s = connect_timeout_s
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._queued: dict[tuple[str, str], deque[_Append]] = {}
        self._busy: set[tuple[str, str]] = set()
        self._ready: deque[tuple[str, str]] = deque()
        self._running_flushes = 0
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[tuple[str, str], int] = {}
        self._drain_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        #: Counters for tests and benchmarks: flushes (transactions) and appends in them.
        self.flushes = 0
        self.appends = 0
        self._commit_metrics = CommitMetrics(telemetry)

    @property
    def failure(self) -> str | None:
        """Always ``None``: the pool reconnects, so no failure here is permanent.

        A database that cannot be reached fails each call with a StoreError instead.
        """
        return None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        if self._closed:
            raise StoreError(internal="A closed PostgresStore cannot be reopened; make a new one.")
        self._loop = asyncio.get_running_loop()
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=min(2, self.pool_size), max_size=self.pool_size,
                timeout=self._connect_timeout_s, reset=_nothing_to_reset,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings={"synchronous_commit": "on", "application_name": "ballast"})
            async with self._pool.acquire() as conn:
                await migrate(conn)
        except StoreError:
            await self._close_pool()
            raise
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            await self._close_pool()
            raise StoreError(
                internal=f"cannot open the PostgreSQL store: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._flush_tasks:
            await asyncio.gather(*list(self._flush_tasks), return_exceptions=True)
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, OSError):
                pool.terminate()

    def _require_pool(self) -> Any:
        if self._pool is None:
            state = "closed" if self._closed else "not open"
            raise StoreError(internal=f"PostgresStore is {state}.")
        return self._pool

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        try:
            return await self._require_pool().fetchrow(query, *args)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from exc

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        try:
            rows: list[Any] = await self._require_pool().fetch(query, *args)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from exc
        return rows

    async def _in_transaction(self, fn: Callable[[Any], Any], **options: Any) -> Any:
        """Run ``fn(conn)`` in one transaction; client errors pass, others become StoreError."""
        try:
            async with self._require_pool().acquire() as conn, conn.transaction(**options):
                return await fn(conn)
        except (ClientError, StoreError):
            raise
        except Exception as exc:
            raise _store_error(exc) from exc

    # ------------------------------------------------------------------ sessions

    async def create_session(self, tenant: str, session_id: str, title: str | None,
                             participants: list[str]) -> SessionRecord:
        names = list(dict.fromkeys(participants))
        if len(names) > self.limits.max_participants:
            raise session_limit(session_id, "participants", self.limits.max_participants)
        created_at = _now_iso()

        async def create(conn: Any) -> SessionRecord:
            sid = await conn.fetchval(
                "INSERT INTO sessions (tenant, session_id, state, title, participant_count, created_at)"
                " VALUES ($1, $2, 'open', $3, $4, $5) ON CONFLICT (tenant, session_id) DO NOTHING"
                " RETURNING sid", tenant, session_id, title, len(names), created_at)
            if sid is None:
                raise session_exists(session_id)
            if names:
                await conn.execute(
                    "INSERT INTO participants (sid, pos, name)"
                    " SELECT $1, n.pos, n.name FROM unnest($2::text[]) WITH ORDINALITY AS n(name, pos)",
                    sid, names)
            return SessionRecord(session_id, "open", title, names, 0, 0, {}, created_at, tenant)

        record: SessionRecord = await self._in_transaction(create)
        return record

    async def get_session(self, tenant: str, session_id: str) -> SessionRecord | None:
        row = await self._fetchrow(sql.SELECT_SESSION, tenant, session_id)
        return None if row is None else _record(row)

    async def get_session_with_job(self, tenant: str, session_id: str
                                   ) -> tuple[SessionRecord | None, JobRecord | None]:
        row = await self._fetchrow(sql.SELECT_SESSION_WITH_JOB, tenant, session_id)
        if row is None:
            return None, None
        return _record(row), _job(row)

    async def list_sessions(self, tenant: str, after: str | None, limit: int
                            ) -> list[tuple[SessionRecord, JobRecord | None]]:
        if limit <= 0:
            return []

        async def page(conn: Any) -> list[tuple[SessionRecord, JobRecord | None]]:
            start = 0
            if after is not None:
                start = await conn.fetchval(
                    "SELECT sid FROM sessions WHERE tenant = $1 AND session_id = $2", tenant, after)
                if start is None:
                    raise unknown_cursor(after)
            return [(_record(r), _job(r)) for r in await conn.fetch(sql.LIST_SESSIONS, tenant, start, limit)]

        # One snapshot for the cursor and the page.
        result: list[tuple[SessionRecord, JobRecord | None]] = await self._in_transaction(
            page, isolation="repeatable_read", readonly=True)
        return result

    # ------------------------------------------------------------------ mutations: reads

    async def list_mutations(self, tenant: str, session_id: str, after: int,
                             limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return [_mutation(r) for r in await self._fetch(sql.SELECT_PAGE, tenant, session_id, after, limit)]

    def iter_mutations(self, tenant: str, session_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Pages fetched on the store's event loop, handed to this (worker) thread."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        loop = self._loop
        if loop is None:
            raise StoreError(internal="PostgresStore is not open; call open() first.")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("iter_mutations blocks: call it from a worker thread, not the event loop")
        after = 0
        while True:
            page = asyncio.run_coroutine_threadsafe(
                self.list_mutations(tenant, session_id, after, batch), loop).result()
            yield from page
            if len(page) < batch:
                return
            after = page[-1]["seq"]

    # ------------------------------------------------------------------ mutations: appends

    async def append(self, tenant: str, session_id: str,
                     mutations: list[dict[str, Any]]) -> AppendResult:
        if self._closed or self._pool is None:
            state = "closed" if self._closed else "not open"
            raise StoreError(internal=f"PostgresStore is {state}; the append was not queued.")
        key = (tenant, session_id)
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        queue = self._queued.get(key)
        if queue is None:
            queue = self._queued[key] = deque()
            if key not in self._busy:
                self._ready.append(key)
        queue.append(_Append(key, mutations, future, contextvars.copy_context()))
        self._pending[key] = self._pending.get(key, 0) + 1
        self._kick()
        return await future

    async def pending(self, tenant: str, session_id: str) -> int:
        return self._pending.get((tenant, session_id), 0)

    async def drain(self, tenant: str, session_id: str) -> None:
        key = (tenant, session_id)
        if not self._pending.get(key):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.setdefault(key, []).append(waiter)
        await waiter

    def _kick(self) -> None:
        while self._ready and self._running_flushes < self._flushers:
            self._running_flushes += 1
            task = asyncio.get_running_loop().create_task(self._flush_loop())
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)

    def _take(self) -> list[_Append]:
        """Everything queued for sessions no other flush holds, within the bounds."""
        taken: list[_Append] = []
        weight = 0
        while self._ready and len(taken) < MAX_FLUSH_REQUESTS and weight < MAX_FLUSH_MUTATIONS:
            key = self._ready.popleft()
            queue = self._queued.pop(key)
            self._busy.add(key)
            while queue and len(taken) < MAX_FLUSH_REQUESTS and weight < MAX_FLUSH_MUTATIONS:
                item = queue.popleft()
                taken.append(item)
                weight += len(item.mutations)
            if queue:  # the rest waits for this session's flush to end, in order
                self._queued[key] = queue
        return taken

    async def _flush_loop(self) -> None:
        try:
            while True:
                group = self._take()
                if not group:
                    return
                outcomes, deferred = await self._commit(group, wait=False)
                self._settle(outcomes)
                if deferred:
                    # Sessions another process held, after the others' callers were
                    # answered: one transaction that waits for their locks, in order.
                    more, _ = await self._commit(deferred, wait=True)
                    self._settle(more)
                self._kick()
        finally:
            self._running_flushes -= 1
            if self._ready and not self._closed:
                self._kick()

    async def _commit(self, group: list[_Append], *, wait: bool
                      ) -> tuple[list[_Outcome], list[_Append]]:
        """One transaction for the group; if it fails, each append again on its own.

        Unless told to ``wait``, a transaction over several sessions takes their locks
        with ``SKIP LOCKED``, so it never waits on another process while holding locks
        of its own (two such transactions would queue behind each other's whole lock
        sets); the appends of the sessions it skipped are returned, to be committed
        next in a transaction that waits. Waiting transactions lock in ``sid`` order,
        so they cannot deadlock with each other.
        """
        self.flushes += 1
        try:
            return await self._transaction(
                group, skip_locked=not wait and len({a.key for a in group}) > 1)
        except _CommitUnknown as unknown:
            # COMMIT was sent and no answer came: the batch may be stored. Running it
            # again would store its id-less mutations twice, so every caller is told
            # it failed; a client's retry with the same ids is then answered exactly.
            return [(item, None, unknown.error) for item in group], []
        except Exception as exc:  # rolled back: nothing of the group is stored
            if len(group) == 1:
                return [(group[0], None, exc)], []
        outcomes: list[_Outcome] = []
        for item in group:
            self.flushes += 1
            try:
                outcomes.extend((await self._transaction([item], skip_locked=False))[0])
            except _CommitUnknown as unknown:
                outcomes.append((item, None, unknown.error))
            except Exception as exc:
                outcomes.append((item, None, exc))
        return outcomes, []

    async def _transaction(self, group: list[_Append], *, skip_locked: bool
                           ) -> tuple[list[_Outcome], list[_Append]]:
        """Numbered first on the guess that every id is new, as repeats are rare (a
        client retrying); if the insert finds one already stored, the transaction is
        rolled back and run again with the batch's stored ids looked up first."""
        try:
            return await self._attempt(group, skip_locked, lookup_ids=False)
        except _IdsAlreadyStored:
            return await self._attempt(group, skip_locked, lookup_ids=True)

    async def _attempt(self, group: list[_Append], skip_locked: bool, *, lookup_ids: bool
                       ) -> tuple[list[_Outcome], list[_Append]]:
        keys = list(dict.fromkeys(a.key for a in group))
        async with self._require_pool().acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                results, deferred = await self._write(conn, group, keys, skip_locked, lookup_ids)
            except BaseException:
                try:
                    await transaction.rollback()
                except Exception:  # a dead connection: the server rolls back anyway
                    pass
                raise
            try:
                await transaction.commit()
            except Exception as exc:
                if _rolled_back(exc):  # the server refused the COMMIT: a retry is safe
                    raise
                raise _CommitUnknown(exc) from exc
        self._commit_metrics.committed(result for _, result, _ in results)
        return results, deferred  # committed

    async def _write(self, conn: Any, group: list[_Append], keys: list[tuple[str, str]],
                     skip_locked: bool, lookup_ids: bool) -> tuple[list[_Outcome], list[_Append]]:
        """Inside the append transaction: lock, read, number and write the group."""
        tenants, ids = [k[0] for k in keys], [k[1] for k in keys]
        deferred: list[_Append] = []
        locked = await conn.fetch(sql.LOCK_SKIP if skip_locked else sql.LOCK_SESSIONS, tenants, ids)
        sessions: dict[tuple[str, str], _SessionState] = {
            (r["tenant"], r["session_id"]): _SessionState(
                r["sid"], r["state"], r["last_seq"], r["mutation_count"],
                r["participant_count"], r["label_count"]) for r in locked}
        if skip_locked and len(sessions) < len(keys):
            missing = [k for k in keys if k not in sessions]
            held = {(r[0], r[1]) for r in await conn.fetch(
                sql.EXISTING_SESSIONS, [k[0] for k in missing], [k[1] for k in missing])}
            deferred = [item for item in group if item.key in held]
            group = [item for item in group if item.key not in held]
        await self._load_existing(conn, group, sessions, lookup_ids)
        writes = _Writes()
        results: list[_Outcome] = []
        for item in group:
            session = sessions.get(item.key)
            try:
                if session is None:
                    raise session_not_found(item.key[1])
                results.append((item, self._number(item, session, writes), None))
            except ClientError as exc:
                results.append((item, None, exc))
        if writes.sessions:
            inserted = await conn.fetchval(sql.WRITE_BATCH, *writes.args())
            if inserted != len(writes.m[0]):
                if lookup_ids:  # the ids were looked up under the lock: cannot happen
                    raise StoreError(internal="a mutation id was stored twice under one lock")
                raise _IdsAlreadyStored
        return results, deferred

    async def _load_existing(self, conn: Any, group: list[_Append],
                             sessions: dict[tuple[str, str], _SessionState], lookup_ids: bool) -> None:
        # Each key once: a batch of utterances names the same few labels again and again.
        id_keys: dict[tuple[int, str], None] = {}
        name_keys: dict[tuple[int, str], None] = {}
        label_keys: dict[tuple[int, str], None] = {}
        for item in group:
            session = sessions.get(item.key)
            if session is None:
                continue
            sid = session.sid
            for m in item.mutations:
                type_ = m["type"]
                if lookup_ids and m.get("id") is not None:
                    id_keys[(sid, m["id"])] = None
                if type_ == "utterance" or type_ == "speaker_renamed":
                    label_keys[(sid, m["speaker"])] = None
                elif type_ == "participant_joined":
                    name_keys[(sid, m["name"])] = None
                elif type_ == "speakers_resolved":
                    for label in m["mapping"]:
                        label_keys[(sid, label)] = None
        if not (id_keys or name_keys or label_keys):
            return
        ids, names, labels = ([[k[0] for k in keys], [k[1] for k in keys]]
                              for keys in (id_keys, name_keys, label_keys))
        by_sid = {s.sid: s for s in sessions.values()}
        for kind, sid, key, seq in await conn.fetch(sql.SELECT_EXISTING, *ids, *names, *labels):
            session = by_sid[sid]
            if kind == 0:
                session.known_ids[key] = seq
            elif kind == 1:
                session.participants.add(key)
            else:
                session.labels.add(key)

    def _number(self, item: _Append, session: _SessionState, writes: _Writes) -> AppendResult:
        """Number one append against the session as the flush has moved it so far."""
        if session.state != "open":
            raise session_not_open(item.key[1], session.state)
        known = dict(session.known_ids)
        accepted, rows, last_seq = ingest.number(item.mutations, session.last_seq, known, session.sid)
        derived = ingest.derive(item.mutations, accepted)
        new_names = [n for n in derived.joined if n not in session.participants]
        new_labels = [k for k in derived.labels if k not in session.labels]
        ingest.check_limits(item.key[1], self.limits, mutations=session.mutation_count + len(rows),
                            participants=session.participant_count + len(new_names),
                            labels=session.label_count + len(new_labels))
        # Accepted: move the session on and add the rows to the flush's writes.
        session.known_ids = known
        sid = session.sid
        m = writes.m
        for _, seq, mutation_id, type_, payload in rows:
            m[0].append(sid)
            m[1].append(seq)
            m[2].append(mutation_id)
            m[3].append(type_)
            m[4].append(payload)
        for name in new_names:
            session.participant_count += 1
            writes.p[0].append(sid)
            writes.p[1].append(session.participant_count)
            writes.p[2].append(name)
            session.participants.add(name)
        for label in new_labels:
            session.labels.add(label)
            writes.names.setdefault((sid, label), None)
        for label, name in derived.names.items():
            writes.names[(sid, label)] = name
        session.label_count += len(new_labels)
        session.mutation_count += len(rows)
        session.last_seq = last_seq
        if rows:
            writes.sessions[sid] = session
        return AppendResult(accepted, last_seq)

    def _settle(self, outcomes: list[_Outcome]) -> None:
        drained: list[tuple[str, str]] = []
        for item, result, error in outcomes:
            self.appends += 1
            key = item.key
            left = self._pending.get(key, 1) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
                drained.append(key)
            if error is None:
                if not item.future.done():
                    item.future.set_result(result)  # type: ignore[arg-type]
                continue
            exc: BaseException = error
            if not isinstance(error, ClientError):
                exc = error if isinstance(error, StoreError) else _store_error(error)
                item.context.run(self._notify_failure, key[1], item.mutations, error)
            if not item.future.done():
                item.future.set_exception(exc)
        for key in {a.key for a, _, _ in outcomes}:
            self._busy.discard(key)
            if key in self._queued:
                self._ready.append(key)
        for key in drained:
            for waiter in self._drain_waiters.pop(key, []):
                if not waiter.done():
                    waiter.set_result(None)

    def _notify_failure(self, session_id: str, mutations: list[dict[str, Any]],
                        error: BaseException) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(session_id, mutations, error)
        except Exception as hook_error:  # a broken hook must not stop the queue
            log.error("store.failure_hook_failed", session_id=session_id,
                      error_type=type(hook_error).__name__, error=str(hook_error))

    # ------------------------------------------------------------------ finalize jobs

    async def get_job(self, tenant: str, session_id: str) -> JobRecord | None:
        row = await self._fetchrow(
            f"SELECT {sql.JOB_COLUMNS} FROM jobs j JOIN sessions s ON s.sid = j.sid"
            " WHERE s.tenant = $1 AND s.session_id = $2", tenant, session_id)
        return _job(row)

    async def _write_job(self, conn: Any, sid: int, job: JobRecord) -> None:
        cols = ", ".join(jobrecord.JOB_COLUMNS)
        params = ", ".join(f"${i + 2}" for i in range(len(jobrecord.JOB_COLUMNS)))
        updates = ", ".join(f"{c} = excluded.{c}" for c in jobrecord.JOB_COLUMNS)
        await conn.execute(f"INSERT INTO jobs (sid, {cols}) VALUES ($1, {params})"
                           f" ON CONFLICT (sid) DO UPDATE SET {updates}", sid, *jobrecord.job_row(job))

    async def start_job(self, tenant: str, session_id: str, owner: str, lease_s: float,
                        progress: dict[str, Any]) -> JobStart:
        async def start(conn: Any) -> JobStart:
            row = await conn.fetchrow(
                f"SELECT s.sid, s.state AS session_state, {sql.JOB_COLUMNS}, {sql.NOW} AS now FROM sessions s"
                " LEFT JOIN jobs j ON j.sid = s.sid WHERE s.tenant = $1 AND s.session_id = $2"
                " FOR UPDATE OF s", tenant, session_id)
            if row is None:
                raise session_not_found(session_id)
            previous = _job(row)
            if not jobrecord.plan_start(session_id, row["session_state"], previous):
                assert previous is not None
                return JobStart(previous, None)
            job = jobrecord.started(previous, owner, row["now"], lease_s, progress)
            await self._write_job(conn, row["sid"], job)
            await conn.execute("UPDATE sessions SET state = 'finalizing' WHERE sid = $1", row["sid"])
            return JobStart(job, Lease(tenant, session_id, owner, job.fence))

        result: JobStart = await self._in_transaction(start)
        return result

    async def save_progress(self, lease: Lease, progress: dict[str, Any], lease_s: float) -> None:
        await self._fenced(lease, "progress = $4, lease_expires = " + sql.NOW + " + $5, heartbeat_at = "
                           + sql.NOW, orjson.dumps(progress).decode(), lease_s)

    async def renew_lease(self, lease: Lease, lease_s: float) -> None:
        await self._fenced(lease, f"lease_expires = {sql.NOW} + $4, heartbeat_at = {sql.NOW}", lease_s)

    async def release_job(self, lease: Lease) -> None:
        await self._fenced(lease, "owner = NULL, lease_expires = 0")

    async def _fenced(self, lease: Lease, assignments: str, *args: Any) -> None:
        """One UPDATE of the job that happens only while ``lease`` holds it."""
        row = await self._fetchrow(
            f"UPDATE jobs j SET {assignments} FROM sessions s"
            " WHERE s.sid = j.sid AND s.tenant = $1 AND s.session_id = $2"
            " AND j.fence = $3 AND j.state = 'running' RETURNING j.sid",
            lease.tenant, lease.session_id, lease.fence, *args)
        if row is None:
            raise LeaseLost(internal=f"finalize job of {lease.tenant}/{lease.session_id} is no longer "
                                     f"held with fence {lease.fence}")

    async def finish_job(self, lease: Lease, state: str, progress: dict[str, Any],
                         report: dict[str, Any] | None) -> None:
        async def finish(conn: Any) -> None:
            row = await conn.fetchrow(
                f"SELECT s.sid, s.state AS session_state, {sql.JOB_COLUMNS} FROM sessions s"
                " LEFT JOIN jobs j ON j.sid = s.sid WHERE s.tenant = $1 AND s.session_id = $2"
                " FOR UPDATE OF s", lease.tenant, lease.session_id)
            job = _job(row)
            session_state = jobrecord.plan_finish(
                "" if row is None else row["session_state"], job, lease, state, report)
            assert row is not None and job is not None
            ended = JobRecord(state, job.attempt, job.fence, None, 0.0, job.heartbeat_at,
                              job.takeovers, progress)
            await self._write_job(conn, row["sid"], ended)
            await conn.execute("UPDATE sessions SET state = $2 WHERE sid = $1", row["sid"], session_state)
            if report is not None:
                await conn.execute(
                    "INSERT INTO reports (sid, body) VALUES ($1, $2)"
                    " ON CONFLICT (sid) DO UPDATE SET body = excluded.body",
                    row["sid"], orjson.dumps(report).decode())

        await self._in_transaction(finish)

    async def claim_expired_jobs(self, owner: str, lease_s: float, limit: int = 16) -> list[ClaimedJob]:
        async def claim(conn: Any) -> list[ClaimedJob]:
            # SKIP LOCKED: two processes claiming at once split the expired jobs between
            # them instead of queueing on the same rows.
            rows = await conn.fetch(
                f"SELECT s.sid, s.tenant, s.session_id, {sql.JOB_COLUMNS}, {sql.NOW} AS now"
                " FROM jobs j JOIN sessions s ON s.sid = j.sid"
                f" WHERE j.state = 'running' AND j.lease_expires < {sql.NOW}"
                # Its own jobs still run in this process (their lease ran out while the
                # database was unreachable); their own END or renewal lands later.
                " AND j.owner IS DISTINCT FROM $2"
                " ORDER BY j.lease_expires LIMIT $1 FOR UPDATE OF j, s SKIP LOCKED", limit, owner)
            claimed: list[ClaimedJob] = []
            for row in rows:
                job = _job(row)
                assert job is not None
                after = jobrecord.taken_over(job, owner, row["now"], lease_s)
                await self._write_job(conn, row["sid"], after)
                if after.state != "running":
                    await conn.execute("UPDATE sessions SET state = $2 WHERE sid = $1", row["sid"],
                                       jobrecord.SESSION_AFTER[after.state])
                    continue
                claimed.append(ClaimedJob(Lease(row["tenant"], row["session_id"], owner, after.fence), after))
            return claimed

        result: list[ClaimedJob] = await self._in_transaction(claim)
        return result

    # ------------------------------------------------------------------ reports

    async def get_report(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow(
            "SELECT r.body FROM reports r JOIN sessions s ON s.sid = r.sid"
            " WHERE s.tenant = $1 AND s.session_id = $2", tenant, session_id)
        if row is None:
            return None
        report: dict[str, Any] = orjson.loads(row[0])
        return report
