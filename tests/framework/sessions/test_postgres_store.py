"""What only the PostgreSQL adapter has: migrations, commit settings, shared transactions.

The port's guarantees are in test_store_port.py (run on both adapters); these tests
use a fresh database from ``pg_url`` and skip when no server is configured.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from ballast.errors import StoreError
from ballast.sessions.postgres_schema import MIGRATIONS, SCHEMA_VERSION, current_version, migrate
from ballast.sessions.postgres_store import PostgresStore

T = "default"


def note(text: str, mutation_id: str | None = None) -> dict[str, Any]:
    mutation: dict[str, Any] = {"type": "note", "text": text}
    if mutation_id is not None:
        mutation["id"] = mutation_id
    return mutation


async def test_a_database_of_the_previous_version_is_upgraded_in_place(pg_url: str) -> None:
    assert SCHEMA_VERSION >= 2
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn, target=SCHEMA_VERSION - 1)  # what the previous release made
        assert await current_version(conn) == SCHEMA_VERSION - 1
        sid = await conn.fetchval(
            "INSERT INTO sessions (tenant, session_id, state, title, created_at, last_seq, mutation_count)"
            " VALUES ('default', 'old', 'open', 'Before', '2026-01-01T00:00:00.000+00:00', 1, 1)"
            " RETURNING sid")
        await conn.execute("INSERT INTO mutations (sid, seq, mutation_id, type, payload)"
                           " VALUES ($1, 1, 'm1', 'note', '{\"text\": \"kept\"}')", sid)
    finally:
        await conn.close()
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    try:
        record = await store.get_session(T, "old")
        assert record is not None and record.title == "Before" and record.last_seq == 1
        result = await store.append(T, "old", [note("again", "m1"), note("new")])
        assert [(a.seq, a.duplicate) for a in result.accepted] == [(1, True), (2, False)]
        start = await store.start_job(T, "old", "me", 30, {})  # the table the upgrade added
        assert start.lease is not None
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM ballast_schema_version ORDER BY 1")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await conn.close()


async def test_processes_starting_together_migrate_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url, pool_size=2) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].create_session(T, "s", None, [])
        assert (await stores[3].get_session(T, "s")) is not None
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM ballast_schema_version") == len(MIGRATIONS)
    finally:
        await conn.close()


async def test_a_database_newer_than_the_code_is_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO ballast_schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    store = PostgresStore(pg_url, pool_size=2)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert "newer than" in info.value.internal
    await store.close()


async def test_an_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://ballast:s3cret@127.0.0.1:1/none", pool_size=2,
                          connect_timeout_s=2)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert info.value.status >= 500
    await store.close()


async def test_every_connection_commits_synchronously(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_size=3)
    await store.open()
    try:
        pool: Any = store._pool
        settings = await asyncio.gather(*(pool.fetchval("SHOW synchronous_commit") for _ in range(6)))
        assert set(settings) == {"on"}
    finally:
        await store.close()


async def test_concurrent_appends_share_transactions(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_size=4, flushers=2)
    await store.open()
    try:
        for i in range(8):
            await store.create_session(T, f"s{i}", None, [])
        before = store.flushes
        results = await asyncio.gather(*(store.append(T, f"s{i % 8}", [note(f"n{i}")]) for i in range(200)))
        assert len(results) == 200
        assert store.flushes - before < 100  # 200 appends in far fewer transactions
        for i in range(8):
            stored = await store.list_mutations(T, f"s{i}", 0, 100)
            assert [m["seq"] for m in stored] == list(range(1, 26))
            assert [m["text"] for m in stored] == [f"n{j}" for j in range(i, 200, 8)]  # call order
    finally:
        await store.close()


async def test_a_batch_that_fails_in_the_database_fails_alone(pg_url: str) -> None:
    failures: list[tuple[str, int, str]] = []
    def hook(sid: str, mutations: list[dict[str, Any]], err: BaseException) -> None:
        failures.append((sid, len(mutations), type(err).__name__))

    store = PostgresStore(pg_url, pool_size=4, flushers=1, on_failure=hook)
    await store.open()
    try:
        pool: Any = store._pool
        await pool.execute(
            "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.payload LIKE '%boom%' THEN RAISE EXCEPTION 'refused'; END IF;"
            " RETURN NEW; END $$;"
            " CREATE TRIGGER refuse_boom BEFORE INSERT ON mutations"
            " FOR EACH ROW EXECUTE FUNCTION refuse_boom()")
        await store.create_session(T, "a", None, [])
        await store.create_session(T, "b", None, [])
        outcomes = await asyncio.gather(
            store.append(T, "a", [note("one")]),
            store.append(T, "b", [note("boom"), note("with it")]),
            store.append(T, "a", [note("two")]),
            store.append(T, "b", [note("three")]),
            return_exceptions=True)
        assert isinstance(outcomes[1], StoreError)
        assert [o.last_seq for o in outcomes if not isinstance(o, BaseException)] == [1, 2, 1]
        assert failures == [("b", 2, "RaiseError")]
        assert [m["text"] for m in await store.list_mutations(T, "b", 0, 10)] == ["three"]
        assert [m["text"] for m in await store.list_mutations(T, "a", 0, 10)] == ["one", "two"]
    finally:
        await store.close()


async def test_a_session_held_by_another_process_does_not_hold_up_the_others(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_size=4, flushers=1)
    await store.open()
    other = await asyncpg.connect(pg_url)  # another process, in the middle of an append
    try:
        await store.create_session(T, "held", None, [])
        await store.create_session(T, "free", None, [])
        await store.append(T, "held", [note("first")])
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM sessions WHERE session_id = 'held' FOR UPDATE")
        held = asyncio.ensure_future(store.append(T, "held", [note("second", "h2")]))
        free = asyncio.ensure_future(store.append(T, "free", [note("only")]))
        # One shared flush takes both; the held session is skipped, the free one commits.
        assert (await asyncio.wait_for(free, 10)).last_seq == 1
        await asyncio.sleep(0.2)
        assert not held.done()
        await other.execute("UPDATE sessions SET last_seq = last_seq WHERE session_id = 'held'")
        await tx.commit()
        result = await asyncio.wait_for(held, 10)
        assert [(a.seq, a.duplicate) for a in result.accepted] == [(2, False)]
        assert [m["text"] for m in await store.list_mutations(T, "held", 0, 10)] == ["first", "second"]
    finally:
        await other.close()
        await store.close()


async def test_a_commit_without_an_answer_is_not_run_again(pg_url: str) -> None:
    """The connection dies during COMMIT: the batch may be stored, so it is not retried.

    Retrying it (as a batch that failed before COMMIT is) would store its id-less
    mutations twice if the first COMMIT had in fact gone through.
    """
    store = PostgresStore(pg_url, pool_size=4, flushers=1)
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        # A constraint trigger runs at COMMIT: it makes the COMMIT slow enough to cut.
        await admin.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;"
            " CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON mutations"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
        await store.create_session(T, "a", None, [])
        await store.create_session(T, "b", None, [])
        before = store.flushes
        appends = asyncio.gather(store.append(T, "a", [note("x")]), store.append(T, "b", [note("y")]),
                                 return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + 10
        while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COMMIT%' AND state = 'active'"):
            assert asyncio.get_running_loop().time() < deadline, "the COMMIT never started"
            await asyncio.sleep(0.02)
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE query LIKE 'COMMIT%' AND state = 'active'")
        outcomes = await asyncio.wait_for(appends, 20)
        assert all(isinstance(o, StoreError) for o in outcomes), outcomes
        assert store.flushes - before == 1  # one transaction: nothing was run again
        await admin.execute("DROP TRIGGER slow_commit ON mutations")
        assert await admin.fetchval("SELECT count(*) FROM mutations") == 0  # cut before commit
        again = await store.append(T, "a", [note("x")])  # the store goes on
        assert again.last_seq == 1
    finally:
        await admin.close()
        await store.close()
