"""JobWaiters: one event per session, set by the job's end, and nothing left behind."""

from __future__ import annotations

import asyncio

from ballast.sessions.waiters import JobWaiters, wait_for


async def test_a_jobs_end_wakes_every_waiter_and_leaves_no_entry() -> None:
    waiters = JobWaiters()
    woken: list[bool] = []

    async def waiter() -> None:
        with waiters.watching("s1") as ended:
            woken.append(await wait_for(ended, 30))

    tasks = [asyncio.create_task(waiter()) for _ in range(200)]
    await asyncio.sleep(0)
    assert waiters.waiting("s1") == 200 and len(waiters) == 1
    waiters.notify("s1")
    await asyncio.gather(*tasks)
    assert woken == [True] * 200
    assert len(waiters) == 0 and waiters.waiting("s1") == 0


async def test_a_waiter_after_the_notification_waits_for_the_next_job() -> None:
    waiters = JobWaiters()
    with waiters.watching("s1") as first:
        waiters.notify("s1")
        with waiters.watching("s1") as second:
            assert first.is_set() and not second.is_set()
            assert await wait_for(second, 0.01) is False
    waiters.notify("nobody-waits")  # nothing to do, nothing created
    assert len(waiters) == 0


async def test_a_waiter_that_leaves_takes_its_entry_with_it() -> None:
    waiters = JobWaiters()

    async def waiter() -> None:
        with waiters.watching("s1") as ended:
            await wait_for(ended, 30)

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert waiters.waiting("s1") == 1
    task.cancel()  # as when a request's own budget ends
    await asyncio.gather(task, return_exceptions=True)
    assert len(waiters) == 0


async def test_wait_for_times_out_and_never_waits_on_a_set_event() -> None:
    event = asyncio.Event()
    assert await wait_for(event, 0) is False
    assert await wait_for(event, 0.01) is False
    event.set()
    assert await wait_for(event, 0) is True

