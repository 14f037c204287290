"""The executor for blocking work, and the unbounded fallback used without a bulkhead.

Blocking work (SQLite reads, CPU-heavy finalize stages) must leave the event loop. All
of it goes through one :class:`BlockingExecutor` chosen at app build, so a plugin can
bound it. ``run`` copies the caller's context variables into the worker thread, so log
lines from the thread keep their ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class BlockingExecutor(Protocol):
    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread and return its result.

        May raise :class:`ballast.errors.Overloaded` when capacity is exhausted.
        """
        ...

    def shutdown(self) -> None:
        """Stop accepting work and release the threads (waits for running work)."""
        ...


class LoopDefaultExecutor:
    """No bound of its own: hands work to the event loop's default thread pool.

    ``in_flight`` counts work handed over and not yet done (busy or waiting for one of
    the pool's threads, which this class cannot tell apart), for the metrics.
    """

    def __init__(self) -> None:
        self.in_flight = 0

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            return await loop.run_in_executor(None, functools.partial(ctx.run, fn, *args))
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        return None
