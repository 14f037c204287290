"""The SQL of the SQLite adapter: each write applied inside a group transaction, each read.

Writes run on the writer thread inside the group transaction (and their own savepoint,
see :mod:`ballast.sessions.sqlite_store`); a raised error undoes that write alone.
Reads run on a reader thread with that thread's connection. Every statement is scoped
by tenant: a session is found by ``(tenant, session_id)`` and everything else by the
session's key.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

import orjson

from ballast.sessions import ingest, jobrecord
from ballast.sessions.store import (
    AppendResult,
    ClaimedJob,
    JobRecord,
    JobStart,
    Lease,
    SessionLimits,
    SessionRecord,
    session_exists,
    session_not_found,
    session_not_open,
    unknown_cursor,
)

_loads = orjson.loads


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# A session with its participants, named speakers and job, in ONE statement: one
# snapshot without a read transaction, and one step for the hot read.
_SESSION_FULL: Final = (
    "SELECT s.tenant, s.session_id, s.state, s.title, s.mutation_count, s.last_seq, s.created_at,"
    " (SELECT json_group_array(name) FROM"
    "   (SELECT name FROM participants WHERE session_pk = s.pk ORDER BY position)),"
    " (SELECT json_group_object(label, name) FROM speakers WHERE session_pk = s.pk AND name IS NOT NULL), "
    + ", ".join(f"j.{c}" for c in jobrecord.JOB_COLUMNS)
    + " FROM sessions s LEFT JOIN jobs j ON j.session_pk = s.pk"
)
_SELECT_SESSION: Final = _SESSION_FULL + " WHERE s.tenant = ? AND s.session_id = ?"
_SELECT_FOR_APPEND: Final = (
    "SELECT pk, state, last_seq, mutation_count, participant_count, label_count FROM sessions"
    " WHERE tenant = ? AND session_id = ?"
)
_SELECT_PK: Final = "SELECT pk, state FROM sessions WHERE tenant = ? AND session_id = ?"
# One statement whatever the batch size (an IN list of ? would compile one per size);
# each id is one lookup in the partial unique index.
_SELECT_KNOWN_IDS: Final = (
    "SELECT mutation_id, seq FROM mutations"
    " WHERE session_pk = ? AND mutation_id IN (SELECT value FROM json_each(?))"
)
_INSERT_MUTATION: Final = (
    "INSERT INTO mutations (session_pk, seq, mutation_id, type, payload) VALUES (?, ?, ?, ?, ?)"
)
SELECT_PAGE: Final = (
    "SELECT seq, mutation_id, type, payload FROM mutations"
    " WHERE session_pk = ? AND seq > ? ORDER BY seq LIMIT ?"
)
_JOB_COLUMNS: Final = ", ".join(jobrecord.JOB_COLUMNS)
_SELECT_JOB: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE session_pk = ?"
_UPSERT_JOB: Final = (
    f"INSERT INTO jobs (session_pk, {_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (session_pk) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in jobrecord.JOB_COLUMNS)
)


def mutation_dict(seq: int, mutation_id: str | None, type_: str, payload: str) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": seq, "id": mutation_id, "type": type_}
    out.update(_loads(payload))
    return out


# ---------------------------------------------------------------------- sessions


def apply_create(record: SessionRecord, limits: SessionLimits, conn: sqlite3.Connection) -> SessionRecord:
    names = list(dict.fromkeys(record.participants))
    ingest.check_limits(record.session_id, limits, mutations=0, participants=len(names), labels=0)
    try:
        cur = conn.execute(
            "INSERT INTO sessions (tenant, session_id, state, title, participant_count, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record.tenant, record.session_id, record.state, record.title, len(names), record.created_at),
        )
    except sqlite3.IntegrityError as exc:
        if conn.execute(_SELECT_PK, (record.tenant, record.session_id)).fetchone() is not None:
            raise session_exists(record.session_id) from exc
        raise
    pk = cur.lastrowid
    conn.executemany("INSERT INTO participants (session_pk, name, position) VALUES (?, ?, ?)",
                     [(pk, name, i) for i, name in enumerate(names, 1)])
    record.participants = names
    return record


def _insert_rows(conn: sqlite3.Connection, pk: int, rows: list[ingest.Row]) -> None:
    conn.executemany(_INSERT_MUTATION, rows)


def apply_append(tenant: str, session_id: str, mutations: list[dict[str, Any]], limits: SessionLimits,
                 conn: sqlite3.Connection) -> AppendResult:
    row = conn.execute(_SELECT_FOR_APPEND, (tenant, session_id)).fetchone()
    if row is None:
        raise session_not_found(session_id)
    pk, state, last_seq, mutation_count, participant_count, label_count = row
    if state != "open":
        raise session_not_open(session_id, state)

    accepted, rows, seq = ingest.number(mutations, last_seq, {}, key=pk)
    if not rows:
        return AppendResult(accepted, seq)
    if mutation_count + len(rows) > limits.max_mutations:
        ingest.check_limits(session_id, limits, mutations=mutation_count + len(rows),
                            participants=0, labels=0)
    if not any(m.get("id") is not None for m in mutations):
        _insert_rows(conn, pk, rows)
    else:
        # Repeats are rare (a client retrying), so first assume every id is new and let
        # the unique index say otherwise, rather than look each id up before inserting.
        # One row needs no savepoint: a failed statement leaves nothing behind.
        several = len(rows) > 1
        if several:
            conn.execute("SAVEPOINT fresh_ids")
        try:
            _insert_rows(conn, pk, rows)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname != "SQLITE_CONSTRAINT_UNIQUE":
                raise
            if several:
                conn.execute("ROLLBACK TO fresh_ids")
                conn.execute("RELEASE fresh_ids")
            ids = [m["id"] for m in mutations if m.get("id") is not None]
            known = dict(conn.execute(_SELECT_KNOWN_IDS, (pk, _json(ids))).fetchall())
            accepted, rows, seq = ingest.number(mutations, last_seq, known, key=pk)
            _insert_rows(conn, pk, rows)
        else:
            if several:
                conn.execute("RELEASE fresh_ids")
    if not rows:
        return AppendResult(accepted, seq)

    derived = ingest.derive(mutations, accepted)
    if derived.joined:
        # Positions only order the names: one per candidate, gaps where a name was known.
        base = conn.execute("SELECT coalesce(max(position), 0) FROM participants WHERE session_pk = ?",
                            (pk,)).fetchone()[0]
        cur = conn.executemany("INSERT OR IGNORE INTO participants (session_pk, name, position)"
                               " VALUES (?, ?, ?)",
                               [(pk, name, base + i) for i, name in enumerate(derived.joined, 1)])
        participant_count += cur.rowcount
    if derived.labels:
        cur = conn.executemany("INSERT OR IGNORE INTO speakers (session_pk, label) VALUES (?, ?)",
                               [(pk, label) for label in derived.labels])
        label_count += cur.rowcount
    ingest.check_limits(session_id, limits, mutations=mutation_count + len(rows),
                        participants=participant_count, labels=label_count)
    if derived.names:
        conn.executemany("UPDATE speakers SET name = ? WHERE session_pk = ? AND label = ?",
                         [(name, pk, label) for label, name in derived.names.items()])
    conn.execute(
        "UPDATE sessions SET mutation_count = mutation_count + ?, last_seq = ?,"
        " participant_count = ?, label_count = ? WHERE pk = ?",
        (len(rows), seq, participant_count, label_count, pk),
    )
    return AppendResult(accepted, seq)


# ---------------------------------------------------------------------- job transitions


def _job(conn: sqlite3.Connection, pk: int) -> JobRecord | None:
    row = conn.execute(_SELECT_JOB, (pk,)).fetchone()
    return None if row is None else jobrecord.job_from_row(row)


def _write_job(conn: sqlite3.Connection, pk: int, job: JobRecord) -> None:
    conn.execute(_UPSERT_JOB, (pk, *jobrecord.job_row(job)))


def _leased(conn: sqlite3.Connection, lease: Lease) -> tuple[int, str, JobRecord]:
    row = conn.execute(_SELECT_PK, (lease.tenant, lease.session_id)).fetchone()
    job = None if row is None else _job(conn, row[0])
    job = jobrecord.check_lease(job, lease)
    assert row is not None
    return row[0], row[1], job


def apply_start(tenant: str, session_id: str, owner: str, lease_s: float, progress: dict[str, Any],
                conn: sqlite3.Connection) -> JobStart:
    row = conn.execute(_SELECT_PK, (tenant, session_id)).fetchone()
    if row is None:
        raise session_not_found(session_id)
    pk, state = row
    previous = _job(conn, pk)
    if not jobrecord.plan_start(session_id, state, previous):
        assert previous is not None
        return JobStart(previous, None)
    job = jobrecord.started(previous, owner, time.time(), lease_s, progress)
    _write_job(conn, pk, job)
    conn.execute("UPDATE sessions SET state = 'finalizing' WHERE pk = ?", (pk,))
    conn.execute("DELETE FROM reports WHERE session_pk = ?", (pk,))
    return JobStart(job, Lease(tenant, session_id, owner, job.fence))


def apply_progress(lease: Lease, progress: dict[str, Any] | None, lease_s: float,
                   conn: sqlite3.Connection) -> None:
    pk, _, job = _leased(conn, lease)
    now = time.time()
    job.lease_expires, job.heartbeat_at = now + lease_s, now
    if progress is not None:
        job.progress = progress
    _write_job(conn, pk, job)


def apply_finish(lease: Lease, state: str, progress: dict[str, Any], report: dict[str, Any] | None,
                 conn: sqlite3.Connection) -> None:
    row = conn.execute(_SELECT_PK, (lease.tenant, lease.session_id)).fetchone()
    job = None if row is None else _job(conn, row[0])
    session_after = jobrecord.plan_finish("" if row is None else row[1], job, lease, state, report)
    assert row is not None and job is not None
    pk = row[0]
    job.state, job.progress, job.owner, job.lease_expires = state, progress, None, 0.0
    _write_job(conn, pk, job)
    conn.execute("UPDATE sessions SET state = ? WHERE pk = ?", (session_after, pk))
    if report is not None:
        conn.execute("INSERT INTO reports (session_pk, body) VALUES (?, ?)"
                     " ON CONFLICT (session_pk) DO UPDATE SET body = excluded.body", (pk, _json(report)))


def apply_release(lease: Lease, conn: sqlite3.Connection) -> None:
    pk, _, job = _leased(conn, lease)
    _write_job(conn, pk, jobrecord.released(job))


def apply_claim(owner: str, lease_s: float, limit: int, conn: sqlite3.Connection) -> list[ClaimedJob]:
    now = time.time()
    rows = conn.execute(
        f"SELECT s.pk, s.tenant, s.session_id, s.state, {', '.join('j.' + c for c in jobrecord.JOB_COLUMNS)}"
        " FROM jobs j JOIN sessions s ON s.pk = j.session_pk"
        " WHERE j.state = 'running' AND j.lease_expires < ? AND j.owner IS NOT ?"
        " ORDER BY j.lease_expires LIMIT ?",
        (now, owner, limit)).fetchall()
    claimed: list[ClaimedJob] = []
    for pk, tenant, session_id, _state, *job_cols in rows:
        job = jobrecord.taken_over(jobrecord.job_from_row(job_cols), owner, now, lease_s)
        _write_job(conn, pk, job)
        if job.state == "running":
            claimed.append(ClaimedJob(Lease(tenant, session_id, owner, job.fence), job))
        else:
            conn.execute("UPDATE sessions SET state = ? WHERE pk = ?",
                         (jobrecord.SESSION_AFTER[job.state], pk))
    return claimed


# ---------------------------------------------------------------------- reads


def _session(row: Any) -> tuple[SessionRecord, JobRecord | None]:
    tenant, sid, state, title, mutation_count, last_seq, created_at, participants, speakers = row[:9]
    record = SessionRecord(sid, state, title, _loads(participants), mutation_count, last_seq,
                           _loads(speakers), created_at, tenant)
    return record, None if row[9] is None else jobrecord.job_from_row(row[9:])


def read_session(tenant: str, session_id: str, conn: sqlite3.Connection) -> SessionRecord | None:
    row = conn.execute(_SELECT_SESSION, (tenant, session_id)).fetchone()
    return None if row is None else _session(row)[0]


def read_session_with_job(tenant: str, session_id: str,
                          conn: sqlite3.Connection) -> tuple[SessionRecord | None, JobRecord | None]:
    row = conn.execute(_SELECT_SESSION, (tenant, session_id)).fetchone()
    return (None, None) if row is None else _session(row)


def read_sessions(tenant: str, after: str | None, limit: int,
                  conn: sqlite3.Connection) -> list[tuple[SessionRecord, JobRecord | None]]:
    start = 0
    if after is not None:
        found = conn.execute(_SELECT_PK, (tenant, after)).fetchone()
        if found is None:
            raise unknown_cursor(after)
        start = found[0]
    rows = conn.execute(_SESSION_FULL + " WHERE s.tenant = ? AND s.pk > ? ORDER BY s.pk LIMIT ?",
                        (tenant, start, limit)).fetchall()
    return [_session(row) for row in rows]


def session_pk(tenant: str, session_id: str, conn: sqlite3.Connection) -> int | None:
    row = conn.execute(_SELECT_PK, (tenant, session_id)).fetchone()
    return None if row is None else int(row[0])


def read_page(tenant: str, session_id: str, after: int, limit: int,
              conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT m.seq, m.mutation_id, m.type, m.payload FROM mutations m"
        " WHERE m.session_pk = (SELECT pk FROM sessions WHERE tenant = ? AND session_id = ?)"
        " AND m.seq > ? ORDER BY m.seq LIMIT ?", (tenant, session_id, after, limit)).fetchall()
    return [mutation_dict(*row) for row in rows]


def read_job(tenant: str, session_id: str, conn: sqlite3.Connection) -> JobRecord | None:
    pk = session_pk(tenant, session_id, conn)
    return None if pk is None else _job(conn, pk)


def read_report(tenant: str, session_id: str, conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT r.body FROM reports r JOIN sessions s ON s.pk = r.session_pk"
        " WHERE s.tenant = ? AND s.session_id = ?", (tenant, session_id)).fetchone()
    if row is None:
        return None
    body: dict[str, Any] = _loads(row[0])
    return body
