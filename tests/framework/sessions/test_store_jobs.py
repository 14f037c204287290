"""The finalize job's state machine in the store: transitions, leases, fencing.

The store tests run on every adapter (the ``stores`` fixture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from ballast.errors import Conflict
from ballast.sessions import jobrecord
from ballast.sessions.store import JobRecord, Lease, LeaseLost

T = "default"
StoreFactory = Callable[..., AbstractAsyncContextManager[Any]]
REPORT = {"summary": "done"}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _state(store: Any, sid: str) -> tuple[str, str | None]:
    record, job = await store.get_session_with_job(T, sid)
    assert record is not None
    return record.state, None if job is None else job.state


async def test_start_and_end_change_the_job_and_its_session_together(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        assert await _state(store, "s") == ("open", None)
        first = await store.start_job(T, "s", "p1", 15, {"stages": []})
        assert first.lease is not None and first.job.attempt == 1 and first.job.fence == 1
        assert await _state(store, "s") == ("finalizing", "running")
        await store.finish_job(first.lease, "timed_out", {"error": {"title": "t", "detail": "d"}}, None)
        assert await _state(store, "s") == ("failed", "timed_out")
        assert await store.get_report(T, "s") is None
        # A repeat of a committed END is refused and changes nothing.
        with pytest.raises(LeaseLost):
            await store.finish_job(first.lease, "succeeded", {}, REPORT)
        assert await _state(store, "s") == ("failed", "timed_out")

        second = await store.start_job(T, "s", "p1", 15, {"stages": []})
        assert second.lease is not None and (second.job.attempt, second.job.fence) == (2, 2)
        await store.finish_job(second.lease, "succeeded", {}, REPORT)
        assert await _state(store, "s") == ("finalized", "succeeded")
        assert await store.get_report(T, "s") == REPORT
        # A succeeded job is returned, not restarted.
        again = await store.start_job(T, "s", "p2", 15, {})
        assert again.lease is None and again.job.state == "succeeded" and again.job.attempt == 2


async def test_a_taken_over_job_refuses_every_write_of_its_old_owner(stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        old = (await store.start_job(T, "s", "old", 0.2, {"stages": [{"name": "freeze"}]})).lease
        assert old is not None
        assert await store.claim_expired_jobs("new", 15) == []  # not expired yet
        await asyncio.sleep(0.3)
        # Its own process never claims it: the job still runs there.
        assert await store.claim_expired_jobs("old", 15) == []
        [claimed] = await store.claim_expired_jobs("new", 15)
        assert claimed.lease.fence == old.fence + 1 and claimed.job.owner == "new"
        assert claimed.job.takeovers == 1 and claimed.job.attempt == 1
        for write in (store.save_progress(old, {}, 15), store.renew_lease(old, 15),
                      store.release_job(old), store.finish_job(old, "failed", {}, None)):
            with pytest.raises(LeaseLost):
                await write
        assert await _state(store, "s") == ("finalizing", "running")
        assert await store.claim_expired_jobs("third", 15) == []  # the new lease holds
        await store.finish_job(claimed.lease, "succeeded", {}, REPORT)
        assert await _state(store, "s") == ("finalized", "succeeded")


async def test_a_released_job_is_claimed_at_once_and_a_job_that_keeps_dying_is_ended(
        stores: StoreFactory) -> None:
    async with stores() as store:
        await store.create_session(T, "s", None, [])
        lease = (await store.start_job(T, "s", "p0", 60, {"stages": [{"name": "report"}]})).lease
        assert lease is not None
        for n in range(1, jobrecord.MAX_TAKEOVERS + 1):
            await store.release_job(lease)  # a clean shutdown: claimable at once
            [claimed] = await store.claim_expired_jobs(f"p{n}", 60)
            assert claimed.job.takeovers == n
            lease = claimed.lease
        await store.release_job(lease)
        assert await store.claim_expired_jobs("last", 60) == []
        record, job = await store.get_session_with_job(T, "s")
        assert record is not None and job is not None
        assert (record.state, job.state) == ("failed", "failed")
        assert job.progress["error"] == jobrecord.ABANDONED_JOB_ERROR
        assert job.progress["stages"] == [{"name": "report", "state": "skipped", "duration_ms": None}]
        # The session can be finalized again.
        assert (await store.start_job(T, "s", "p9", 60, {})).lease is not None


def test_plan_start_refuses_what_cannot_be_finalized() -> None:
    running = JobRecord("running", 1, 1, "p", time.time() + 10, None, 0)
    assert jobrecord.plan_start("s", "open", None) is True
    assert jobrecord.plan_start("s", "failed", JobRecord("failed", 1, 1, None, 0.0, None, 0)) is True
    assert jobrecord.plan_start("s", "finalizing", running) is False
    with pytest.raises(Conflict, match="already finalized"):
        jobrecord.plan_start("s", "finalized", None)
    with pytest.raises(Conflict):
        jobrecord.plan_start("s", "finalizing", None)
    with pytest.raises(LeaseLost):
        jobrecord.check_lease(running, Lease(T, "s", "p", 2))
    assert jobrecord.check_lease(running, Lease(T, "s", "p", 1)) is running
