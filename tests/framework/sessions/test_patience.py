"""A job's blocking work waits for a full bulkhead; a request's is refused at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ballast.errors import Overloaded
from ballast.plugins.bulkhead import BoundedExecutor
from ballast.sessions.patience import patient, run_blocking_for


async def test_patient_work_waits_for_room_and_impatient_work_is_refused() -> None:
    executor = BoundedExecutor(max_workers=1, max_queue=0)
    run = run_blocking_for(executor)
    gate = threading.Event()
    hog = asyncio.ensure_future(executor.run(gate.wait, 10))  # the only worker, held
    await asyncio.sleep(0.05)
    try:
        with pytest.raises(Overloaded):
            await run(sum, [1, 2])  # a request: refused at once

        with patient():  # a job's task is created in here and inherits it
            waiting = asyncio.ensure_future(run(sum, [1, 2]))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # still waiting for the worker, not failed
        gate.set()
        assert await asyncio.wait_for(waiting, 5) == 3
        assert await hog is True
        # Outside the block nothing changed: with room, both kinds simply run.
        assert await run(sum, [2, 2]) == 4
    finally:
        gate.set()
        executor.shutdown()
