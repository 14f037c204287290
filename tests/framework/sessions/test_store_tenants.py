"""Tenants, listing and session limits: on every adapter (the ``stores`` fixture).

The last test looks at the SQLite file itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from ballast.errors import ClientError, Conflict, NotFound
from ballast.sessions.sqlite_store import SQLiteStore
from ballast.sessions.store import SessionLimits

StoreFactory = Callable[..., AbstractAsyncContextManager[Any]]


async def in_thread(fn: Callable[..., Iterator[dict[str, Any]]], *args: Any) -> list[dict[str, Any]]:
    """Drain a blocking iterator on a worker thread, as the service does."""
    return await asyncio.to_thread(lambda: list(fn(*args)))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


def note(text: str, mutation_id: str | None = None) -> dict[str, Any]:
    return {"type": "note", "text": text, **({} if mutation_id is None else {"id": mutation_id})}


def utterance(label: str) -> dict[str, Any]:
    return {"type": "utterance", "speaker": label, "start_ms": 0, "end_ms": 1, "text": "x"}


async def test_every_call_sees_only_its_tenant(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session("a", "demo", "A's", ["Ann"])
        await store.create_session("b", "demo", "B's", ["Bo"])  # ids are per tenant
        with pytest.raises(Conflict):
            await store.create_session("a", "demo", None, [])
        await store.append("a", "demo", [note("for a", "m1")])
        # The same mutation id in the other tenant's session of the same id is new.
        other = await store.append("b", "demo", [note("for b", "m1")])
        assert (other.accepted[0].seq, other.accepted[0].duplicate) == (1, False)

        a = await store.get_session("a", "demo")
        b = await store.get_session("b", "demo")
        assert a is not None and b is not None
        assert (a.title, a.participants, a.tenant) == ("A's", ["Ann"], "a")
        assert (b.title, b.participants, b.tenant) == ("B's", ["Bo"], "b")
        assert [m["text"] for m in await store.list_mutations("b", "demo", 0, 10)] == ["for b"]
        assert [m["text"] for m in await in_thread(store.iter_mutations, "a", "demo")] == ["for a"]

        await store.create_session("a", "only-a", None, [])
        assert await store.get_session("b", "only-a") is None
        assert await store.get_session_with_job("b", "only-a") == (None, None)
        assert await store.list_mutations("b", "only-a", 0, 10) == []
        assert await in_thread(store.iter_mutations, "b", "only-a") == []
        assert await store.get_job("b", "only-a") is None
        assert await store.get_report("b", "only-a") is None
        with pytest.raises(NotFound, match=r"^Session 'only-a' does not exist\.$"):
            await store.append("b", "only-a", [note("x")])
        with pytest.raises(NotFound, match=r"^Session 'only-a' does not exist\.$"):
            await store.start_job("b", "only-a", "me", 15, {})
        # A job started in one tenant is not the other tenant's.
        started = await store.start_job("a", "demo", "me", 15, {})
        assert started.lease is not None and started.lease.tenant == "a"
        assert await store.get_job("b", "demo") is None
        b_after = await store.get_session("b", "demo")
        assert b_after is not None and b_after.state == "open"


async def test_list_sessions_pages_in_creation_order(stores: StoreFactory) -> None:
    async with stores() as store:
        ids = [f"s{i:02d}" for i in range(7)]
        for i, sid in enumerate(ids):
            await store.create_session("a", sid, None, [])
            if i % 2:
                await store.create_session("b", f"b{i}", None, [])
        # Creation order, not id order.
        await store.create_session("a", "a-late", None, [])
        seen: list[str] = []
        after = None
        while True:
            page = await store.list_sessions("a", after, 3)
            seen.extend(r.session_id for r, _ in page)
            if len(page) < 3:
                break
            after = page[-1][0].session_id
        assert seen == [*ids, "a-late"]
        assert [r.session_id for r, _ in await store.list_sessions("b", None, 10)] == ["b1", "b3", "b5"]
        with pytest.raises(ClientError, match="after"):
            await store.list_sessions("b", "s01", 10)  # another tenant's id is no cursor
        lease = (await store.start_job("a", "s00", "me", 15, {"stages": []})).lease
        assert lease is not None
        [(record, job)] = await store.list_sessions("a", None, 1)
        assert record.state == "finalizing" and job is not None and job.state == "running"


async def test_limits_refuse_the_whole_batch(stores: StoreFactory) -> None:
    limits = SessionLimits(max_participants=3, max_speaker_labels=2, max_mutations=6)
    async with stores(limits=limits) as store:
        with pytest.raises(ClientError) as info:
            await store.create_session("a", "big", None, ["p1", "p2", "p3", "p4"])
        assert info.value.status == 409 and "at most 3 participants" in info.value.public_detail
        await store.create_session("a", "s", None, ["p1", "p1", "p2"])
        joined = [{"type": "participant_joined", "name": n} for n in ("p2", "p3", "p4")]
        with pytest.raises(ClientError, match="at most 3 participants"):
            await store.append("a", "s", [note("kept?"), *joined])
        record = await store.get_session("a", "s")
        assert record is not None and (record.last_seq, record.participants) == (0, ["p1", "p2"])
        await store.append("a", "s", joined[:2])  # p2 again and p3: at the limit
        with pytest.raises(ClientError, match="at most 2 distinct speaker labels"):
            await store.append("a", "s", [utterance("x"), utterance("y"), utterance("z")])
        await store.append("a", "s", [utterance("x"), utterance("y"), utterance("x")])
        rename = {"type": "speaker_renamed", "speaker": "z", "name": "Zed"}
        with pytest.raises(ClientError, match="speaker labels"):
            await store.append("a", "s", [rename])
        with pytest.raises(ClientError, match="at most 6 mutations"):
            await store.append("a", "s", [note("1"), note("2")])
        result = await store.append("a", "s", [note("1")])
        assert result.last_seq == 6
        record = await store.get_session("a", "s")
        assert record is not None
        assert record.participants == ["p1", "p2", "p3"] and record.mutation_count == 6


def test_participants_and_names_are_rows_not_a_rewritten_document(tmp_path: Path) -> None:
    path = tmp_path / "t.db"

    async def main() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.create_session("a", "s", None, ["Ann"])
            joined = [{"type": "participant_joined", "name": f"p{i}"} for i in range(300)]
            await store.append("a", "s", joined)
            await store.append("a", "s", [
                {"type": "speaker_renamed", "speaker": "spk_0", "name": "Ann"},
                {"type": "speakers_resolved", "mapping": {"spk_1": "p1", "spk_0": "Ann B."}}])
            record = await store.get_session("a", "s")
            assert record is not None
            assert record.participants == ["Ann", *(f"p{i}" for i in range(300))]
            assert record.speakers == {"spk_0": "Ann B.", "spk_1": "p1"}
        finally:
            await store.close()

    run(main())
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM participants").fetchone()[0] == 301
    assert conn.execute("SELECT participant_count, label_count FROM sessions").fetchone() == (301, 2)
    conn.close()
