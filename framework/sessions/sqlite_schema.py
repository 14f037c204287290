"""The SQLite schema and its migrations, versioned and run on start.

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction (so two processes
starting on one file migrate it once) and is recorded in ``schema_version``; ``PRAGMA
user_version`` mirrors the latest version for a quick look with the sqlite3 shell. A
file newer than this code is refused rather than misread.

Version 2 (tenants, leases, rows instead of documents):

* ``sessions`` has an integer key ``pk`` that orders sessions by creation (listing
  pages by it) and that every other table refers to; ``(tenant, session_id)`` is unique.
* participants and speaker labels are rows, so an append touches only the rows its
  batch names; ``participant_count`` and ``label_count`` are kept with the session for
  the limits.
* ``jobs`` holds the finalize job's state machine in columns (state, attempt, fence,
  owner, lease expiry, heartbeat, takeovers) and its progress as JSON.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from ballast.errors import StoreError

SCHEMA_VERSION: Final = 2

_V2_TABLES: Final = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);
CREATE TABLE sessions (
    pk                INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant            TEXT NOT NULL,
    session_id        TEXT NOT NULL,
    state             TEXT NOT NULL
                      CHECK (state IN ('open', 'finalizing', 'finalized', 'failed')),
    title             TEXT,
    mutation_count    INTEGER NOT NULL DEFAULT 0,
    last_seq          INTEGER NOT NULL DEFAULT 0,
    participant_count INTEGER NOT NULL DEFAULT 0,
    label_count       INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT NOT NULL,
    UNIQUE (tenant, session_id)
);
CREATE TABLE mutations (
    session_pk  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    mutation_id TEXT,
    type        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    PRIMARY KEY (session_pk, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX mutations_by_id ON mutations (session_pk, mutation_id)
    WHERE mutation_id IS NOT NULL;
CREATE TABLE participants (
    session_pk INTEGER NOT NULL,
    name       TEXT NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (session_pk, name)
) WITHOUT ROWID;
CREATE INDEX participants_in_order ON participants (session_pk, position);
CREATE TABLE speakers (
    session_pk INTEGER NOT NULL,
    label      TEXT NOT NULL,
    name       TEXT,
    PRIMARY KEY (session_pk, label)
) WITHOUT ROWID;
CREATE TABLE jobs (
    session_pk    INTEGER PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'timed_out')),
    attempt       INTEGER NOT NULL,
    fence         INTEGER NOT NULL,
    owner         TEXT,
    lease_expires REAL NOT NULL DEFAULT 0,
    heartbeat_at  REAL,
    takeovers     INTEGER NOT NULL DEFAULT 0,
    progress      TEXT NOT NULL
);
CREATE INDEX jobs_running ON jobs (lease_expires) WHERE state = 'running';
CREATE TABLE reports (
    session_pk INTEGER PRIMARY KEY,
    body       TEXT NOT NULL
);
"""

# Version 1 kept sessions by id alone, participants and speakers as JSON documents and
# each job as one JSON body. Its rows move to version 2 in the default tenant.
_V1_TO_V2: Final = """
DROP INDEX mutations_by_id;
ALTER TABLE sessions RENAME TO v1_sessions;
ALTER TABLE mutations RENAME TO v1_mutations;
ALTER TABLE jobs RENAME TO v1_jobs;
ALTER TABLE reports RENAME TO v1_reports;
{tables}
INSERT INTO sessions (tenant, session_id, state, title, mutation_count, last_seq, created_at)
    SELECT 'default', session_id, state, title, mutation_count, last_seq, created_at
    FROM v1_sessions ORDER BY created_at, rowid;
INSERT INTO mutations (session_pk, seq, mutation_id, type, payload)
    SELECT s.pk, m.seq, m.mutation_id, m.type, m.payload
    FROM v1_mutations m JOIN sessions s ON s.tenant = 'default' AND s.session_id = m.session_id;
INSERT OR IGNORE INTO participants (session_pk, name, position)
    SELECT s.pk, p.value, p.key + 1
    FROM v1_sessions v JOIN sessions s ON s.tenant = 'default' AND s.session_id = v.session_id,
         json_each(v.participants) p;
INSERT OR IGNORE INTO speakers (session_pk, label)
    SELECT session_pk, json_extract(payload, '$.speaker') FROM mutations
    WHERE type IN ('utterance', 'speaker_renamed');
INSERT OR IGNORE INTO speakers (session_pk, label)
    SELECT m.session_pk, r.key FROM mutations m, json_each(m.payload, '$.mapping') r
    WHERE m.type = 'speakers_resolved';
INSERT INTO speakers (session_pk, label, name)
    SELECT s.pk, n.key, n.value
    FROM v1_sessions v JOIN sessions s ON s.tenant = 'default' AND s.session_id = v.session_id,
         json_each(v.speakers) n
    WHERE true
    ON CONFLICT (session_pk, label) DO UPDATE SET name = excluded.name;
UPDATE sessions SET
    participant_count = (SELECT count(*) FROM participants p WHERE p.session_pk = sessions.pk),
    label_count = (SELECT count(*) FROM speakers k WHERE k.session_pk = sessions.pk);
INSERT INTO jobs (session_pk, state, attempt, fence, owner, lease_expires, heartbeat_at,
                  takeovers, progress)
    SELECT s.pk, json_extract(j.body, '$.state'), coalesce(json_extract(j.body, '$.attempt'), 1),
           coalesce(json_extract(j.body, '$.attempt'), 1), NULL, 0, NULL, 0,
           json_remove(j.body, '$.state', '$.attempt')
    FROM v1_jobs j JOIN sessions s ON s.tenant = 'default' AND s.session_id = j.session_id
    WHERE json_extract(j.body, '$.state') IN ('running', 'succeeded', 'failed', 'timed_out');
INSERT INTO reports (session_pk, body)
    SELECT s.pk, r.body
    FROM v1_reports r JOIN sessions s ON s.tenant = 'default' AND s.session_id = r.session_id;
UPDATE sessions SET state = 'failed'
    WHERE state = 'finalizing'
      AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.session_pk = sessions.pk AND j.state = 'running');
UPDATE jobs SET state = 'failed',
    progress = json_set(progress, '$.error',
        json_object('title', 'Finalize interrupted',
                    'detail', 'The server stopped while the job was running: run finalize again.'))
    WHERE state = 'running'
      AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.pk = jobs.session_pk AND s.state = 'finalizing');
DROP TABLE v1_sessions;
DROP TABLE v1_mutations;
DROP TABLE v1_jobs;
DROP TABLE v1_reports
""".replace("{tables}", _V2_TABLES.replace("CREATE TABLE IF NOT EXISTS schema_version",
                                           "CREATE TABLE schema_version"))


def _statements(script: str) -> list[str]:
    # One statement at a time: executescript() would commit the open transaction. No
    # statement here holds a ';' inside a literal.
    return [s for s in script.split(";") if s.strip()]


def _create_latest(conn: sqlite3.Connection) -> None:
    for statement in _statements(_V2_TABLES):
        conn.execute(statement)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    for statement in _statements(_V1_TO_V2):
        conn.execute(statement)


#: version -> the migration that brings version - 1 up to it.
MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {2: _migrate_1_to_2}


def _record(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                 (version, datetime.now(UTC).isoformat(timespec="seconds")))
    conn.execute(f"PRAGMA user_version = {version}")


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the file to :data:`SCHEMA_VERSION`; returns the version it was found at.

    ``conn`` is in autocommit mode; each step is its own transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found == 0:
            _create_latest(conn)
            _record(conn, SCHEMA_VERSION)
        elif found > SCHEMA_VERSION:
            raise StoreError(internal=(
                f"{path} has schema version {found}, newer than the {SCHEMA_VERSION} this "
                "server knows; upgrade the server or point storage.path elsewhere."))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    version = found
    while 0 < version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while this one waited for the lock.
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current == version:
                MIGRATIONS[version + 1](conn)
                _record(conn, version + 1)
                current = version + 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version = current
    return found
