"""The store port's guarantees, checked on every adapter (the ``stores`` fixture).

Each test runs against SQLite and PostgreSQL. Where a test opens two stores on one
database, they stand for two server processes sharing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from ballast.errors import ClientError, Conflict, NotFound
from ballast.sessions.store import LeaseLost, SessionLimits

T = "default"
StoreFactory = Callable[..., AbstractAsyncContextManager[Any]]


def note(text: str, mutation_id: str | None = None) -> dict[str, Any]:
    mutation: dict[str, Any] = {"type": "note", "text": text}
    if mutation_id is not None:
        mutation["id"] = mutation_id
    return mutation


def utterance(speaker: str, n: int, mutation_id: str | None = None) -> dict[str, Any]:
    mutation: dict[str, Any] = {"type": "utterance", "speaker": speaker, "start_ms": n * 1000,
                                "end_ms": n * 1000 + 900, "text": f"u{n}"}
    if mutation_id is not None:
        mutation["id"] = mutation_id
    return mutation


async def test_sessions_are_per_tenant_and_ids_unique_within_one(stores: StoreFactory) -> None:
    async with stores() as store:
        record = await store.create_session(T, "s1", "Standup", ["Ann", "Bob", "Ann"])
        assert record.participants == ["Ann", "Bob"] and record.state == "open"
        assert record.last_seq == 0 and record.mutation_count == 0
        with pytest.raises(Conflict):
            await store.create_session(T, "s1", None, [])
        other = await store.create_session("acme", "s1", "Other", [])
        assert other.tenant == "acme"
        got = await store.get_session(T, "s1")
        assert got is not None and got.title == "Standup" and got.participants == ["Ann", "Bob"]
        assert (await store.get_session("acme", "s1")).title == "Other"  # type: ignore[union-attr]
        assert await store.get_session("nobody", "s1") is None
        assert await store.get_session_with_job("nobody", "s1") == (None, None)
        await store.append("acme", "s1", [note("a")])
        assert (await store.get_session(T, "s1")).last_seq == 0  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await store.append("nobody", "s1", [note("x")])
        assert await store.list_mutations("nobody", "s1", 0, 10) == []


async def test_two_stores_on_one_database_number_gaplessly(stores: StoreFactory) -> None:
    sessions = ["a", "b", "c"]

    async def writer(store: Any, w: int) -> list[tuple[str, int, str]]:
        out = []
        for r in range(10):
            sid = sessions[(w + r) % len(sessions)]
            size = 1 + (w + r) % 3
            batch = [note(f"w{w}r{r}m{k}", f"w{w}r{r}m{k}") for k in range(size)]
            result = await store.append(T, sid, batch)
            seqs = [a.seq for a in result.accepted]
            assert seqs == list(range(seqs[0], seqs[0] + size))  # a batch is contiguous
            out += [(sid, a.seq, a.id) for a in result.accepted]
        return out

    async with stores() as first, stores() as second:
        for sid in sessions:
            await first.create_session(T, sid, None, [])
        results = await asyncio.gather(*(writer(first if w % 2 else second, w) for w in range(8)))
        acked = [row for rows in results for row in rows]
        for sid in sessions:
            stored = await second.list_mutations(T, sid, 0, 1000)
            assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
            assert sorted((m["seq"], m["id"]) for m in stored) == sorted(
                (seq, mid) for s, seq, mid in acked if s == sid)
            record = await first.get_session(T, sid)
            assert record is not None and record.last_seq == len(stored) == record.mutation_count


async def test_repeated_ids_keep_their_seq_across_batches_and_stores(stores: StoreFactory) -> None:
    async with stores() as first, stores() as second:
        await first.create_session(T, "s", None, [])
        r1 = await first.append(T, "s", [note("a", "m1"), note("b"), note("c", "m2")])
        assert [(a.seq, a.duplicate) for a in r1.accepted] == [(1, False), (2, False), (3, False)]
        # A repeat through the other store (another process), in and across batches.
        r2 = await second.append(T, "s", [note("a2", "m1"), note("d", "m3"), note("d2", "m3")])
        assert [(a.id, a.seq, a.duplicate) for a in r2.accepted] == [
            ("m1", 1, True), ("m3", 4, False), ("m3", 4, True)]
        assert r2.last_seq == 4
        r3 = await first.append(T, "s", [note("again", "m2")])
        assert [(a.seq, a.duplicate) for a in r3.accepted] == [(3, True)] and r3.last_seq == 4
        stored = await second.list_mutations(T, "s", 0, 100)
        assert [(m["seq"], m["id"], m["text"]) for m in stored] == [
            (1, "m1", "a"), (2, None, "b"), (3, "m2", "c"), (4, "m3", "d")]


async def test_concurrent_repeats_of_one_id_store_it_once(stores: StoreFactory) -> None:
    async with stores() as first, stores() as second:
        await first.create_session(T, "s", None, [])
        results = await asyncio.gather(*(
            (first if i % 2 else second).append(T, "s", [note(f"try{i}", "same")]) for i in range(12)))
        assert {r.accepted[0].seq for r in results} == {1}
        assert sum(not r.accepted[0].duplicate for r in results) == 1
        assert len(await first.list_mutations(T, "s", 0, 100)) == 1


async def test_participants_and_speakers_follow_the_log(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, ["Ann"])
        await store.append(T, "s", [
            {"type": "participant_joined", "name": "Bob"},
            {"type": "participant_joined", "name": "Ann"},
            utterance("spk_0", 1), utterance("spk_1", 2),
            {"type": "speaker_renamed", "speaker": "spk_0", "name": "Ann"},
        ])
        await store.append(T, "s", [{"type": "speakers_resolved", "mapping": {"spk_1": "Bob"}},
                                    {"type": "participant_joined", "name": "Cy"}])
        record = await store.get_session(T, "s")
        assert record is not None
        assert record.participants == ["Ann", "Bob", "Cy"]
        assert record.speakers == {"spk_0": "Ann", "spk_1": "Bob"}
        assert record.mutation_count == 7 and record.last_seq == 7


async def test_a_batch_past_a_limit_is_refused_whole(stores: StoreFactory) -> None:
    limits = SessionLimits(max_participants=3, max_speaker_labels=2, max_mutations=5)
    async with stores(limits=limits) as store:
        await store.create_session(T, "s", None, ["Ann"])
        with pytest.raises(ClientError) as info:
            await store.append(T, "s", [note("ok"), {"type": "participant_joined", "name": "B"},
                                        {"type": "participant_joined", "name": "C"},
                                        {"type": "participant_joined", "name": "D"}])
        assert info.value.status == 409
        with pytest.raises(ClientError):
            await store.append(T, "s", [utterance("a", 1), utterance("b", 2), utterance("c", 3)])
        ok = await store.append(T, "s", [utterance("a", 1), utterance("b", 2), utterance("a", 3)])
        assert ok.last_seq == 3
        with pytest.raises(ClientError):
            await store.append(T, "s", [note("x"), note("y"), note("z")])
        record = await store.get_session(T, "s")
        assert record is not None and record.last_seq == 3 and record.participants == ["Ann"]


async def test_pages_and_the_threaded_stream_are_in_seq_order(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        for start in range(0, 50, 10):
            await store.append(T, "s", [note(f"n{i}") for i in range(start, start + 10)])
        page = await store.list_mutations(T, "s", 20, 7)
        assert [m["seq"] for m in page] == list(range(21, 28))
        assert page[0] == {"seq": 21, "id": None, "type": "note", "text": "n20"}
        streamed = await asyncio.to_thread(lambda: list(store.iter_mutations(T, "s", batch=8)))
        assert [m["seq"] for m in streamed] == list(range(1, 51))


async def test_sessions_are_listed_in_creation_order_per_tenant(stores: StoreFactory) -> None:
    async with stores() as store:
        for i in range(5):
            await store.create_session(T, f"s{i}", None, [])
            await store.create_session("acme", f"x{i}", None, [])
        started = await store.start_job(T, "s1", "me", 30, {})
        first = await store.list_sessions(T, None, 3)
        assert [r.session_id for r, _ in first] == ["s0", "s1", "s2"]
        assert [None if j is None else j.fence for _, j in first] == [None, started.job.fence, None]
        rest = await store.list_sessions(T, "s2", 10)
        assert [r.session_id for r, _ in rest] == ["s3", "s4"]
        with pytest.raises(ClientError):
            await store.list_sessions(T, "x1", 10)  # another tenant's id is no cursor


async def test_drain_waits_for_this_process_appends(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        tasks = [asyncio.ensure_future(store.append(T, "s", [note(f"n{i}")])) for i in range(20)]
        await asyncio.sleep(0)
        await store.drain(T, "s")
        assert await store.pending(T, "s") == 0
        assert all(t.done() for t in tasks)
        assert (await store.get_session(T, "s")).last_seq == 20  # type: ignore[union-attr]


async def test_a_job_lease_is_fenced_and_taken_over_when_it_expires(stores: StoreFactory) -> None:
    async with stores() as a, stores() as b:
        await a.create_session(T, "s", None, [])
        await a.append(T, "s", [note("x")])
        progress = {"stages": [{"name": "freeze", "state": "pending"}]}
        start = await a.start_job(T, "s", "owner-a", 0.3, progress)
        assert start.lease is not None and start.job.state == "running" and start.job.attempt == 1
        lease_a = start.lease
        again = await b.start_job(T, "s", "owner-b", 30, {})
        assert again.lease is None and again.job.owner == "owner-a"
        with pytest.raises(Conflict):
            await b.append(T, "s", [note("late")])  # the session is finalizing
        await a.save_progress(lease_a, {"stages": [{"name": "freeze", "state": "succeeded"}]}, 0.3)
        assert await b.claim_expired_jobs("owner-b", 30) == []  # the lease is still valid
        await asyncio.sleep(0.5)
        claimed = await b.claim_expired_jobs("owner-b", 30)
        assert len(claimed) == 1
        lease_b = claimed[0].lease
        assert lease_b.fence > lease_a.fence and claimed[0].job.takeovers == 1
        with pytest.raises(LeaseLost):
            await a.save_progress(lease_a, {"stale": True}, 30)
        with pytest.raises(LeaseLost):
            await a.finish_job(lease_a, "succeeded", {"stale": True}, {"summary": "stale"})
        await b.finish_job(lease_b, "succeeded", {"stages": []}, {"summary": "done"})
        session, job = await a.get_session_with_job(T, "s")
        assert session is not None and session.state == "finalized"
        assert job is not None and job.state == "succeeded" and job.progress == {"stages": []}
        assert await a.get_report(T, "s") == {"summary": "done"}
        with pytest.raises(LeaseLost):
            await b.finish_job(lease_b, "succeeded", {}, {"summary": "twice"})


async def test_a_failed_job_can_be_started_again(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        first = await store.start_job(T, "s", "me", 30, {})
        assert first.lease is not None
        await store.finish_job(first.lease, "failed", {"error": {"title": "x"}}, None)
        record = await store.get_session(T, "s")
        assert record is not None and record.state == "failed"
        second = await store.start_job(T, "s", "me", 30, {})
        assert second.lease is not None and second.job.attempt == 2
        assert second.lease.fence > first.lease.fence
        with pytest.raises(NotFound):
            await store.start_job(T, "nope", "me", 30, {})


async def test_reopened_store_reads_back_what_was_acknowledged(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", "T", ["Ann"])
        await store.append(T, "s", [utterance("spk_0", 1, "u1"),
                                    {"type": "speaker_renamed", "speaker": "spk_0", "name": "Ann"}])
    async with stores() as store:
        record = await store.get_session(T, "s")
        assert record is not None and record.last_seq == 2 and record.speakers == {"spk_0": "Ann"}
        again = await store.append(T, "s", [utterance("spk_0", 1, "u1")])
        assert again.accepted[0].duplicate and again.accepted[0].seq == 1
