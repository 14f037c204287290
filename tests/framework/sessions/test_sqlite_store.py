"""The SQLite store against a real file: ordering, idempotency, group commit, recovery."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ballast.errors import Conflict, NotFound, StoreError
from ballast.sessions.sqlite_store import SQLiteStore
from ballast.sessions.store import Lease, Store

Failure = tuple[str, list[dict[str, Any]], BaseException]
T = "default"
OWNER = "test-owner"


async def start(store: SQLiteStore, sid: str, lease_s: float = 15.0) -> Lease:
    """START a job on ``sid`` (its session goes finalizing) and return its lease."""
    begun = await store.start_job(T, sid, OWNER, lease_s, {"stages": []})
    assert begun.lease is not None
    return begun.lease


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


@asynccontextmanager
async def opened(path: Path, **kw: Any) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(path, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def note(text: str, mutation_id: str | None = None) -> dict[str, Any]:
    mutation: dict[str, Any] = {"type": "note", "text": text}
    if mutation_id is not None:
        mutation["id"] = mutation_id
    return mutation


def test_open_creates_directories_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ballast.db"

    async def main() -> None:
        async with opened(path) as store:
            record = await store.create_session(T, "s1", "Standup", ["Ann", "Bob", "Ann"])
            assert record.participants == ["Ann", "Bob"]
            assert record.state == "open" and record.last_seq == 0

    run(main())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [2]


def test_open_waits_for_another_connection_creating_the_file(tmp_path: Path) -> None:
    """Two servers opening one new file (``--workers 2``): while one holds a write
    transaction, SQLite refuses the other's switch to WAL with SQLITE_BUSY at once,
    busy timeout or not; open() waits it out instead of failing."""
    path = tmp_path / "ballast.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE being_made (x)")

    async def main() -> None:
        async def release_soon() -> None:
            await asyncio.sleep(0.3)
            other.execute("ROLLBACK")

        releaser = asyncio.create_task(release_soon())
        async with opened(path) as store:
            assert releaser.done(), "open() returned before the other transaction ended"
            await store.create_session(T, "s1", "Standup", ["Ann"])

    run(main())
    other.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_appenders_get_gapless_seqs_in_arrival_order(tmp_path: Path) -> None:
    sessions = [f"s{i}" for i in range(5)]
    arrival: dict[str, list[str]] = {sid: [] for sid in sessions}

    async def appender(store: SQLiteStore, worker: int) -> None:
        sid = sessions[worker % len(sessions)]
        for round_ in range(8):
            size = 1 + (worker + round_) % 4
            batch = [note(f"w{worker}r{round_}m{k}") for k in range(size)]
            # Arrival order is call order: append() queues before its first await.
            arrival[sid].extend(m["text"] for m in batch)
            result = await store.append(T, sid, batch)
            seqs = [a.seq for a in result.accepted]
            assert seqs == list(range(seqs[0], seqs[0] + size))
            assert result.last_seq >= seqs[-1]
            assert not any(a.duplicate for a in result.accepted)

    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            for sid in sessions:
                await store.create_session(T, sid, None, [])
            await asyncio.gather(*(appender(store, w) for w in range(50)))
            assert store.stats.groups < store.stats.requests  # writes did share commits
            # Concurrent reads share reader wake-ups; each still gets its own answer.
            records = await asyncio.gather(*(store.get_session(T, sid) for sid in sessions * 20))
            assert [r.session_id if r else None for r in records] == sessions * 20
            for sid in sessions:
                stored = await store.list_mutations(T, sid, 0, 10_000)
                assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
                assert [m["text"] for m in stored] == arrival[sid]
                record = await store.get_session(T, sid)
                assert record is not None
                assert record.mutation_count == record.last_seq == len(stored)

    run(main())


def test_duplicate_ids_across_and_within_batches(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            await store.create_session(T, "s", None, [])
            first = await store.append(T, "s", [note("a", "m1"), note("b"), note("a again", "m1")])
            assert [(a.id, a.seq, a.duplicate) for a in first.accepted] == [
                ("m1", 1, False),
                (None, 2, False),
                ("m1", 1, True),
            ]
            assert first.last_seq == 2
            second = await store.append(T, "s", [note("c", "m2"), note("a", "m1")])
            assert [(a.id, a.seq, a.duplicate) for a in second.accepted] == [
                ("m2", 3, False),
                ("m1", 1, True),
            ]
            only_repeats = await store.append(T, "s", [note("a", "m1")])
            assert only_repeats.accepted[0].duplicate and only_repeats.last_seq == 3
            # Ids are per session: the same id elsewhere is new.
            await store.create_session(T, "t", None, [])
            other = await store.append(T, "t", [note("a", "m1")])
            assert (other.accepted[0].seq, other.accepted[0].duplicate) == (1, False)

            stored = await store.list_mutations(T, "s", 0, 100)
            assert [(m["seq"], m["id"], m["text"]) for m in stored] == [
                (1, "m1", "a"),
                (2, None, "b"),
                (3, "m2", "c"),
            ]
            record = await store.get_session(T, "s")
            assert record is not None and record.mutation_count == 3

            # A repeat is not applied again, even if its body differs.
            rename = {"id": "r1", "type": "speaker_renamed", "speaker": "spk_0", "name": "Ann"}
            await store.append(T, "s", [rename])
            await store.append(T, "s", [note("d", "m3"), {**rename, "name": "Eve"}])
            record = await store.get_session(T, "s")
            assert record is not None
            assert (record.speakers, record.mutation_count, record.last_seq) == ({"spk_0": "Ann"}, 5, 5)

    run(main())


def test_unknown_session_existing_id_and_closed_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            with pytest.raises(NotFound, match=r"^Session 'nope' does not exist\.$"):
                await store.append(T, "nope", [note("x")])
            with pytest.raises(NotFound):
                await store.start_job(T, "nope", OWNER, 15, {})
            assert await store.get_session(T, "nope") is None
            assert await store.list_mutations(T, "nope", 0, 10) == []

            await store.create_session(T, "s", "T", [])
            with pytest.raises(Conflict):
                await store.create_session(T, "s", "again", [])
            await store.finish_job(await start(store, "s"), "succeeded", {}, {"summary": ""})
            with pytest.raises(Conflict) as info:
                await store.append(T, "s", [note("late")])
            assert info.value.public_detail == (
                "Session 's' is finalized; mutations are accepted only while it is open."
            )
            record = await store.get_session(T, "s")
            assert record is not None and record.title == "T" and record.last_seq == 0

    run(main())


def test_job_start_is_ordered_with_appends(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            await store.create_session(T, "s", None, [])
            before, frozen, after, again = await asyncio.gather(
                store.append(T, "s", [note("before")]),
                store.start_job(T, "s", OWNER, 15, {}),
                store.append(T, "s", [note("after")]),
                store.start_job(T, "s", "another", 15, {}),
                return_exceptions=True,
            )
            assert not isinstance(before, BaseException) and before.last_seq == 1
            assert not isinstance(frozen, BaseException) and frozen.lease is not None
            assert isinstance(after, Conflict)
            # The second start finds the job running: it gets the job, not a lease.
            assert not isinstance(again, BaseException) and again.lease is None
            assert again.job.owner == OWNER and again.job.fence == frozen.job.fence
            record = await store.get_session(T, "s")
            assert record is not None
            assert (record.state, record.last_seq) == ("finalizing", 1)
            assert await store.pending(T, "s") == 0

    run(main())


def test_failing_batch_is_rolled_back_alone_and_the_rest_of_its_group_commits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    failures: list[Failure] = []

    async def main() -> None:
        async with opened(path, on_failure=lambda *args: failures.append(args)) as store:
            for sid in ("a", "b"):
                await store.create_session(T, sid, None, [])
            setup = sqlite3.connect(path)
            setup.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON mutations WHEN NEW.mutation_id = 'bad'"
                " BEGIN SELECT RAISE(ABORT, 'poisoned mutation'); END"
            )
            setup.commit()
            setup.close()

            # Hold the write lock so the writer blocks on its first group; everything
            # queued meanwhile then shares the next group.
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            first = asyncio.ensure_future(store.append(T, "a", [note("first")]))
            await asyncio.sleep(0.2)
            groups_before = store.stats.groups
            poisoned = [note("ok", "fine"), note("boom", "bad")]
            rest = asyncio.gather(
                store.append(T, "a", [note("a1")]),
                store.append(T, "b", poisoned),
                store.append(T, "a", [note("a2")]),
                store.append(T, "b", [note("b1")]),
                store.get_session_with_job(T, "b"),
                return_exceptions=True,
            )
            await asyncio.sleep(0.2)
            blocker.execute("COMMIT")
            blocker.close()
            assert (await first).last_seq == 1
            a1, bad, a2, b1, state = await rest
            assert store.stats.groups == groups_before + 2  # [first], then the other five

            assert isinstance(bad, StoreError)
            assert "poisoned mutation" in bad.internal
            assert "poisoned" not in bad.public_detail
            assert len(failures) == 1
            assert failures[0][0] == "b" and failures[0][1] is poisoned
            assert isinstance(failures[0][2], sqlite3.Error)

            assert not isinstance(a1, BaseException) and a1.last_seq == 2
            assert not isinstance(a2, BaseException) and a2.last_seq == 3
            assert not isinstance(b1, BaseException) and b1.accepted[0].seq == 1
            assert not isinstance(state, BaseException)
            stored_b = await store.list_mutations(T, "b", 0, 10)
            assert [(m["seq"], m["text"]) for m in stored_b] == [(1, "b1")]

            # The queue keeps going, and a hook that raises breaks nothing.
            def broken_hook(*_: Any) -> None:
                raise RuntimeError("hook bug")

            store.on_failure = broken_hook
            with pytest.raises(StoreError):
                await store.append(T, "b", [note("boom", "bad")])
            assert (await store.append(T, "b", [note("b2")])).last_seq == 2

    run(main())


def test_trigger_that_rolls_back_the_whole_transaction_only_fails_its_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"

    async def main() -> None:
        async with opened(path) as store:
            await store.create_session(T, "s", None, [])
            setup = sqlite3.connect(path)
            setup.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON mutations WHEN NEW.mutation_id = 'bad'"
                " BEGIN SELECT RAISE(ROLLBACK, 'poisoned'); END"
            )
            setup.commit()
            setup.close()
            results = await asyncio.gather(
                *(store.append(T, "s", [note(str(i))]) for i in range(5)),
                store.append(T, "s", [note("x", "bad")]),
                *(store.append(T, "s", [note(str(i))]) for i in range(5, 10)),
                return_exceptions=True,
            )
            assert isinstance(results[5], StoreError)
            assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 5)
            stored = await store.list_mutations(T, "s", 0, 100)
            assert [m["text"] for m in stored] == [str(i) for i in range(10)]
            assert [m["seq"] for m in stored] == list(range(1, 11))

    run(main())


def test_materialized_columns_and_reopen_reads_everything_back(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    utterance = {
        "id": "u1",
        "type": "utterance",
        "speaker": "spk_0",
        "start_ms": 0,
        "end_ms": 1500,
        "text": "Hi, I'm Ann — ünïcode ok",
    }

    async def write() -> None:
        async with opened(path) as store:
            await store.create_session(T, "s", "Planning", ["Ann"])
            await store.append(
                T,
                "s",
                [
                    utterance,
                    {"type": "participant_joined", "name": "Bob"},
                    {"type": "participant_joined", "name": "Ann"},
                    {"type": "participant_left", "name": "Bob"},
                    {"type": "speaker_renamed", "speaker": "spk_0", "name": "Ann"},
                ],
            )
            await store.append(T, "s", [{"type": "speakers_resolved", "mapping": {"spk_1": "Bob"}}])
            lease = await start(store, "s")
            await store.save_progress(lease, {"stages": [], "error": None}, 15)
            await store.finish_job(lease, "succeeded", {"elapsed_ms": 5},
                                   {"summary": "done", "highlights": []})

    async def read_back(store: Store) -> None:  # only the port: mypy checks the adapter fits
        record = await store.get_session(T, "s")
        assert record is not None
        assert record.participants == ["Ann", "Bob"]
        assert record.speakers == {"spk_0": "Ann", "spk_1": "Bob"}
        assert (record.mutation_count, record.last_seq, record.title) == (6, 6, "Planning")
        stored = await store.list_mutations(T, "s", 0, 100)
        assert stored[0] == {"seq": 1, **utterance}
        assert stored[5] == {
            "seq": 6,
            "id": None,
            "type": "speakers_resolved",
            "mapping": {"spk_1": "Bob"},
        }
        assert [m["seq"] for m in await store.list_mutations(T, "s", 2, 2)] == [3, 4]
        job = await store.get_job(T, "s")
        assert job is not None and (job.state, job.attempt, job.owner) == ("succeeded", 1, None)
        assert job.view()["elapsed_ms"] == 5
        record = await store.get_session(T, "s")
        assert record is not None and record.state == "finalized"
        assert await store.get_report(T, "s") == {"summary": "done", "highlights": []}
        assert await store.get_job(T, "missing") is None
        assert await store.get_report(T, "missing") is None

    async def read() -> None:
        async with opened(path) as store:
            await read_back(store)

    run(write())
    run(read())


def test_iter_mutations_streams_all_in_seq_order_from_a_thread(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            await store.create_session(T, "s", None, [])
            await store.create_session(T, "other", None, [])
            for start in range(0, 1000, 100):
                await store.append(T, "s", [note(str(i)) for i in range(start, start + 100)])
            await store.append(T, "other", [note("not mine")])

            def collect(batch: int) -> list[dict[str, Any]]:
                return list(store.iter_mutations(T, "s", batch=batch))

            for batch in (7, 1000, 5000):
                rows = await asyncio.to_thread(collect, batch)
                assert [m["seq"] for m in rows] == list(range(1, 1001))
                assert [m["text"] for m in rows] == [str(i) for i in range(1000)]
            assert list(store.iter_mutations(T, "empty")) == []
            # Abandoning the generator closes its connection without error.
            stream = store.iter_mutations(T, "s", batch=10)
            assert next(stream)["seq"] == 1
            stream.close()

    run(main())


def test_failed_read_raises_store_error_and_readers_go_on(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def main() -> None:
        async with opened(path) as store:
            await store.create_session(T, "s", None, [])
            admin = sqlite3.connect(path)
            admin.execute("DROP TABLE reports")
            admin.commit()
            admin.close()
            with pytest.raises(StoreError) as info:
                await store.get_report(T, "s")
            assert "no such table" in info.value.internal
            assert "no such table" not in info.value.public_detail
            assert (await store.get_session(T, "s")) is not None

    run(main())


def test_drain_waits_for_queued_batches(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            await store.create_session(T, "s", None, [])
            appends = [asyncio.ensure_future(store.append(T, "s", [note(str(i))])) for i in range(20)]
            await asyncio.sleep(0)  # let them queue
            assert 0 < await store.pending(T, "s") <= 20
            await store.drain(T, "s")
            assert await store.pending(T, "s") == 0
            assert all(task.done() for task in appends)
            await store.drain(T, "s")  # nothing pending: returns at once

    run(main())


def test_close_commits_queued_writes_and_refuses_later_ones(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def main() -> None:
        store = SQLiteStore(path, durability="normal")
        await store.open()
        await store.create_session(T, "s", None, [])
        queued = [asyncio.ensure_future(store.append(T, "s", [note(str(i))])) for i in range(50)]
        await asyncio.sleep(0)
        await store.close()
        results = await asyncio.gather(*queued)
        assert max(r.last_seq for r in results) == 50
        with pytest.raises(StoreError):
            await store.append(T, "s", [note("late")])
        with pytest.raises(StoreError):
            await store.get_session(T, "s")

        async with opened(path, durability="normal") as again:
            record = await again.get_session(T, "s")
            assert record is not None and record.last_seq == 50

    run(main())


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_durability_sets_synchronous(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "db.sqlite"
    seen: list[int] = []

    async def main() -> None:
        async with opened(path, durability=durability) as store:
            await store.create_session(T, "s", None, [])

            def probe(conn: sqlite3.Connection) -> int:
                value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
                return value

            seen.append(await store._submit(None, probe))
            assert (await store.append(T, "s", [note("x")])).last_seq == 1

    run(main())
    assert seen == [2 if durability == "full" else 1]


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        SQLiteStore(tmp_path / "db.sqlite", durability="fast")  # type: ignore[arg-type]

    async def main() -> None:
        async with opened(tmp_path / "db.sqlite") as store:
            await store.create_session(T, "s", None, [])
            lease = await start(store, "s")
            with pytest.raises(ValueError, match="a job ends succeeded, failed or timed_out"):
                await store.finish_job(lease, "paused", {}, None)

    run(main())
