"""The SQL of the PostgreSQL adapter (:mod:`ballast.sessions.postgres_store`).

Kept apart so the adapter reads as logic; every statement here is prepared once per
connection by asyncpg and reused. Arrays (``unnest``) carry whole batches, so a
statement's text never depends on the batch size.
"""

from __future__ import annotations

from typing import Final

from ballast.sessions import jobrecord

NOW: Final = "extract(epoch from clock_timestamp())::float8"

SESSION_COLUMNS: Final = (
    "s.sid, s.tenant, s.session_id, s.state, s.title, s.mutation_count, s.last_seq, s.created_at,"
    " coalesce((SELECT array_agg(p.name ORDER BY p.pos) FROM participants p WHERE p.sid = s.sid),"
    " '{}') AS participants,"
    " (SELECT json_object_agg(k.label, k.name ORDER BY k.label) FROM speakers k"
    " WHERE k.sid = s.sid AND k.name IS NOT NULL)::text AS speakers"
)
# Aliased: the session's columns include a ``state`` of their own.
JOB_COLUMNS: Final = ", ".join(f"j.{c} AS job_{c}" for c in jobrecord.JOB_COLUMNS)

SELECT_SESSION: Final = (
    f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.tenant = $1 AND s.session_id = $2")
SELECT_SESSION_WITH_JOB: Final = (
    f"SELECT {SESSION_COLUMNS}, {JOB_COLUMNS} FROM sessions s LEFT JOIN jobs j ON j.sid = s.sid"
    " WHERE s.tenant = $1 AND s.session_id = $2")
LIST_SESSIONS: Final = (
    f"SELECT {SESSION_COLUMNS}, {JOB_COLUMNS} FROM sessions s LEFT JOIN jobs j ON j.sid = s.sid"
    " WHERE s.tenant = $1 AND s.sid > $2 ORDER BY s.sid LIMIT $3")
SELECT_PAGE: Final = (
    "SELECT m.seq, m.mutation_id, m.type, m.payload FROM mutations m"
    " JOIN sessions s ON s.sid = m.sid"
    " WHERE s.tenant = $1 AND s.session_id = $2 AND m.seq > $3 ORDER BY m.seq LIMIT $4")
LOCK_SESSIONS: Final = (
    "SELECT s.sid, s.tenant, s.session_id, s.state, s.last_seq, s.mutation_count,"
    " s.participant_count, s.label_count"
    " FROM sessions s JOIN unnest($1::text[], $2::text[]) AS k(tenant, session_id)"
    " ON s.tenant = k.tenant AND s.session_id = k.session_id"
    " ORDER BY s.sid FOR UPDATE OF s")
LOCK_SKIP: Final = LOCK_SESSIONS + " SKIP LOCKED"
EXISTING_SESSIONS: Final = (
    "SELECT s.tenant, s.session_id FROM sessions s"
    " JOIN unnest($1::text[], $2::text[]) AS k(tenant, session_id)"
    " ON s.tenant = k.tenant AND s.session_id = k.session_id")
# What numbering and the limits need to know, for every session of the flush at once:
# which of the batch's ids, participant names and speaker labels are already stored.
SELECT_EXISTING: Final = (
    "SELECT 0 AS kind, m.sid, m.mutation_id AS key, m.seq FROM mutations m"
    " JOIN unnest($1::bigint[], $2::text[]) AS k(sid, key) ON m.sid = k.sid AND m.mutation_id = k.key"
    " UNION ALL"
    " SELECT 1, p.sid, p.name, 0 FROM participants p"
    " JOIN unnest($3::bigint[], $4::text[]) AS k(sid, key) ON p.sid = k.sid AND p.name = k.key"
    " UNION ALL"
    " SELECT 2, sp.sid, sp.label, 0 FROM speakers sp"
    " JOIN unnest($5::bigint[], $6::text[]) AS k(sid, key) ON sp.sid = k.sid AND sp.label = k.key")
WRITE_BATCH: Final = (
    # A repeated id is skipped (not an error) so that the count of inserted rows can
    # say a batch was numbered on a wrong guess; the primary key still fails loudly.
    "WITH m AS (INSERT INTO mutations (sid, seq, mutation_id, type, payload)"
    "  SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])"
    "  ON CONFLICT (sid, mutation_id) WHERE mutation_id IS NOT NULL DO NOTHING RETURNING 1),"
    " p AS (INSERT INTO participants (sid, pos, name)"
    "  SELECT * FROM unnest($6::bigint[], $7::int[], $8::text[])),"
    " k AS (INSERT INTO speakers (sid, label, name)"
    "  SELECT * FROM unnest($9::bigint[], $10::text[], $11::text[])"
    "  ON CONFLICT (sid, label) DO UPDATE SET name = coalesce(excluded.name, speakers.name)),"
    " u AS (UPDATE sessions s SET mutation_count = v.mc, last_seq = v.ls, participant_count = v.pc,"
    "  label_count = v.lc"
    " FROM unnest($12::bigint[], $13::bigint[], $14::bigint[], $15::int[], $16::int[])"
    "  AS v(sid, mc, ls, pc, lc)"
    " WHERE s.sid = v.sid)"
    " SELECT count(*) FROM m")
