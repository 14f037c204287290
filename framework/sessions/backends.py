"""The store the config asks for: SQLite (embedded default) or PostgreSQL.

Kept apart from the routes so the choice is made in one place, and so the PostgreSQL
driver is imported only by servers that use it (it is an optional extra).
"""

from __future__ import annotations

from pathlib import Path

from ballast.config import Config
from ballast.sessions.store import FailureHook, SessionLimits, Store
from ballast.telemetry import Telemetry


def make_store(config: Config, on_failure: FailureHook | None, telemetry: Telemetry | None = None) -> Store:
    """An unopened store for ``config``'s ``[storage]`` and ``[sessions]`` sections."""
    storage = config.settings.storage
    s = config.settings.sessions
    limits = SessionLimits(s.max_participants, s.max_speaker_labels, s.max_mutations)
    if storage.backend == "postgres":
        from ballast.sessions.postgres_store import PostgresStore

        return PostgresStore(storage.postgres_url(), pool_size=max(2, storage.pool_size),
                             on_failure=on_failure, limits=limits, telemetry=telemetry)
    from ballast.sessions.sqlite_store import SQLiteStore

    return SQLiteStore(Path(storage.path), durability=storage.durability, on_failure=on_failure,
                       limits=limits, telemetry=telemetry)
