"""Schema migrations, run on a database file written by the previous schema (version 1).

``data/schema_v1.db`` was written by the version-1 store (``data/make_schema_v1.py``):
an open session with ids, participants and a renamed speaker; a finalized one with its
job and report; and one left ``finalizing`` with a ``running`` job by a crash.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest

from ballast.errors import StoreError
from ballast.sessions.sqlite_schema import SCHEMA_VERSION
from ballast.sessions.sqlite_store import SQLiteStore

FIXTURE = Path(__file__).parent / "data" / "schema_v1.db"


@pytest.fixture
def v1_db(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copy(FIXTURE, path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "tenant" not in {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
    conn.close()
    return path


def test_version_1_sessions_move_to_the_default_tenant_with_everything(v1_db: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(v1_db)
        await store.open()
        try:
            pages = await store.list_sessions("default", None, 10)
            assert [r.session_id for r, _ in pages] == ["demo", "done", "stuck"]
            assert await store.list_sessions("other", None, 10) == []

            demo, job = await store.get_session_with_job("default", "demo")
            assert demo is not None and job is None
            assert (demo.state, demo.title) == ("open", "Weekly sync")
            assert (demo.mutation_count, demo.last_seq) == (5, 5)
            assert demo.participants == ["Alice", "Bob", "Carol"]
            assert demo.speakers == {"spk_0": "Alice"}
            # Ids survive the migration: a retried mutation is still a duplicate.
            again = await store.append("default", "demo", [
                {"id": "m2", "type": "utterance", "speaker": "spk_1", "start_ms": 1000,
                 "end_ms": 2000, "text": "Bob here."},
                {"type": "participant_joined", "name": "Bob"},
                {"type": "participant_joined", "name": "Dora"}])
            assert [(a.seq, a.duplicate) for a in again.accepted] == [(2, True), (6, False), (7, False)]
            demo = await store.get_session("default", "demo")
            assert demo is not None and demo.participants == ["Alice", "Bob", "Carol", "Dora"]
            rows = await store.list_mutations("default", "demo", 0, 100)
            assert [m["seq"] for m in rows] == [1, 2, 3, 4, 5, 6, 7]
            assert rows[0]["text"] == "Hi, I'm Alice."

            done, done_job = await store.get_session_with_job("default", "done")
            assert done is not None and done.state == "finalized"
            assert done_job is not None and done_job.state == "succeeded" and done_job.attempt == 1
            assert done_job.view()["elapsed_ms"] == 12
            assert (await store.get_report("default", "done") or {})["summary"] == "s"

            # The job a crash left running is unowned with its lease expired: claimed at once.
            stuck, stuck_job = await store.get_session_with_job("default", "stuck")
            assert stuck is not None and stuck.state == "finalizing"
            assert stuck_job is not None and stuck_job.state == "running" and stuck_job.owner is None
            [claimed] = await store.claim_expired_jobs("me", 15)
            assert claimed.lease.session_id == "stuck" and claimed.job.attempt == 2
        finally:
            await store.close()

    asyncio.run(main())
    conn = sqlite3.connect(v1_db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [2]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not any(t.startswith("v1_") for t in tables)
    conn.close()


def test_migration_runs_once(v1_db: Path) -> None:
    async def open_close() -> None:
        store = SQLiteStore(v1_db)
        await store.open()
        await store.close()

    asyncio.run(open_close())
    asyncio.run(open_close())
    conn = sqlite3.connect(v1_db)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [2]
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 3


def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    async def main() -> None:
        with pytest.raises(StoreError, match="newer than"):
            await SQLiteStore(path).open()

    asyncio.run(main())
