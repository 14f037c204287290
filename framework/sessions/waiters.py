"""Waking the requests that wait for a finalize job to end (``GET .../finalize?wait=S``).

A client that wants the end of its job asks once and is answered when the job ends, so
the server does no polling on anyone's behalf: each waiting request sleeps on one
:class:`asyncio.Event` per session, and the job's end sets it. Nothing runs while
requests wait, so two hundred waiters cost two hundred suspended coroutines and one
event. A waiter that leaves (its time ran out, its request was cancelled) takes its
count with it; the last one out removes the session's entry, so nothing accumulates.
A client that disconnects leaves its request parked until the job ends or the wait is
over (aiohttp does not cancel a handler when its client goes), and the request then
answers without reading the job again: a parked coroutine, and no work.

Within one server process the wake-up is exact. A job running in another process of the
same database is not seen here; its waiters are answered when their time is up, with
the job as stored then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Slot:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0


class JobWaiters(Generic[K]):
    """Per-session events that a job's end sets, for the requests waiting on it; keyed
    by whatever identifies a session (``(tenant, session_id)`` in the service)."""

    def __init__(self) -> None:
        self._slots: dict[K, _Slot] = {}

    def __len__(self) -> int:
        """Sessions with at least one waiting request."""
        return len(self._slots)

    def waiting(self, key: K) -> int:
        """How many requests wait on ``key`` now."""
        slot = self._slots.get(key)
        return 0 if slot is None else slot.waiters

    @contextmanager
    def watching(self, key: K) -> Iterator[asyncio.Event]:
        """Register before reading the job, so an end between the read and the wait
        is not missed; the event is set when :meth:`notify` is called for ``key``."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.waiters += 1
        try:
            yield slot.event
        finally:
            slot.waiters -= 1
            if slot.waiters == 0 and self._slots.get(key) is slot:
                del self._slots[key]

    def notify(self, key: K) -> None:
        """The job of ``key`` ended: wake everyone waiting on it (later waiters get a
        fresh event, for the next job)."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            slot.event.set()


async def wait_for(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``; True if it was set."""
    if event.is_set():
        return True
    if timeout_s <= 0:
        return False
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

