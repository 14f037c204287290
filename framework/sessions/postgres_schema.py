"""The PostgreSQL schema of the session store, as numbered migrations applied on start.

Every server process runs :func:`migrate` when it opens the store. Migrations are
applied in order, each in its own transaction together with its row in
``ballast_schema_version``, so a database is always at exactly one version, and a crash
half-way through leaves it at the previous one. Several processes starting at once
serialize on a transaction-scoped advisory lock (there is no row to lock before the
first migration has made one); the second finds the work done. A database at a
version newer than this code knows is refused: an older server must not write rows
whose meaning it does not know.

Design of the tables, for the guarantees of the store port:

* ``sessions`` has a surrogate ``sid`` (an identity column: creation order, and a
  short key for the child tables) and is unique on ``(tenant, session_id)``. Its row
  is the per-session counter: ``last_seq`` is read and moved on under the row's lock
  (``SELECT ... FOR UPDATE``) inside the append transaction, which is what makes
  ``seq`` gapless and ordered whichever process appends.
* ``mutations`` is keyed by ``(sid, seq)``; the partial unique index on
  ``(sid, mutation_id)`` is the backstop of idempotent ids.
* ``participants`` and ``speakers`` are rows, so an append touches only what its batch
  names. ``speakers.name`` is null for a label that was mentioned but never named.
* ``jobs`` holds one finalize job per session with its lease: owner, expiry and the
  fencing token; the partial index finds expired running jobs without a scan.
"""

from __future__ import annotations

from typing import Any, Final

from ballast.errors import StoreError

#: Taken (transaction-scoped) by every migrating process; any constant unlikely to be
#: used by another application sharing the database.
MIGRATION_LOCK: Final = 0x62616C6C  # "ball"

_V1: Final = """
CREATE TABLE sessions (
    sid               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant            text NOT NULL,
    session_id        text NOT NULL,
    state             text NOT NULL
                      CHECK (state IN ('open', 'finalizing', 'finalized', 'failed')),
    title             text,
    mutation_count    bigint NOT NULL DEFAULT 0,
    last_seq          bigint NOT NULL DEFAULT 0,
    participant_count integer NOT NULL DEFAULT 0,
    label_count       integer NOT NULL DEFAULT 0,
    created_at        text NOT NULL,
    UNIQUE (tenant, session_id)
);
CREATE TABLE mutations (
    sid         bigint NOT NULL,
    seq         bigint NOT NULL,
    mutation_id text,
    type        text NOT NULL,
    payload     text NOT NULL,
    PRIMARY KEY (sid, seq)
);
CREATE UNIQUE INDEX mutations_by_id ON mutations (sid, mutation_id)
    WHERE mutation_id IS NOT NULL;
CREATE TABLE participants (
    sid  bigint NOT NULL,
    pos  integer NOT NULL,
    name text NOT NULL,
    PRIMARY KEY (sid, name)
);
CREATE TABLE speakers (
    sid   bigint NOT NULL,
    label text NOT NULL,
    name  text,
    PRIMARY KEY (sid, label)
);
CREATE TABLE reports (
    sid  bigint PRIMARY KEY,
    body text NOT NULL
)
"""

_V2: Final = """
CREATE TABLE jobs (
    sid           bigint PRIMARY KEY,
    state         text NOT NULL
                  CHECK (state IN ('running', 'succeeded', 'failed', 'timed_out')),
    attempt       integer NOT NULL,
    fence         bigint NOT NULL,
    owner         text,
    lease_expires double precision NOT NULL,
    heartbeat_at  double precision,
    takeovers     integer NOT NULL DEFAULT 0,
    progress      text NOT NULL
);
CREATE INDEX jobs_running_by_lease ON jobs (lease_expires) WHERE state = 'running'
"""

#: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``. Append only:
#: a released migration is never edited, a change is a new one.
MIGRATIONS: Final[tuple[str, ...]] = (_V1, _V2)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_VERSION_TABLE: Final = """
CREATE TABLE IF NOT EXISTS ballast_schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def current_version(conn: Any) -> int:
    """The database's schema version (0 for an empty database)."""
    exists = await conn.fetchval("SELECT to_regclass('ballast_schema_version') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM ballast_schema_version")
    return int(version)


async def migrate(conn: Any, target: int = SCHEMA_VERSION) -> int:
    """Bring the database up to ``target``; returns the version it was at before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_VERSION_TABLE)
    before = await current_version(conn)
    if before > SCHEMA_VERSION:
        raise StoreError(internal=(
            f"the PostgreSQL database has schema version {before}, newer than the "
            f"{SCHEMA_VERSION} this server knows; upgrade the server or use another database."))
    for version in range(before, target):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            # Another process may have applied it while this one waited for the lock.
            if await current_version(conn) > version:
                continue
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO ballast_schema_version (version) VALUES ($1)", version + 1)
    return before
