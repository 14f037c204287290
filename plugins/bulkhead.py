"""bulkhead: blocking work runs on a bounded pool, and overload is refused, not queued.

The service once handed blocking work to a 64-thread pool: under load it grew threads,
memory and latency without bound. Here blocking work gets ``max_workers`` threads
(default 8) and at most ``max_queue`` callers waiting for one; past that a caller gets
:class:`~ballast.errors.Overloaded` (a 503 with ``Retry-After``) at once and
``bulkhead.rejected`` is logged. Context variables (the request id) are carried into
the worker threads.

Disabled: blocking work goes to the event loop's default thread pool, unbounded in
queue length.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.errors import Overloaded
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger
from ballast.telemetry import Counter, Telemetry

T = TypeVar("T")
log = get_logger("ballast.bulkhead")


class Settings(PluginSection):
    max_workers: int = Field(8, ge=1, le=256, description="threads for blocking work")
    max_queue: int = Field(64, ge=0, le=100_000, description="callers that may wait for a thread")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent when full")


class BoundedExecutor:
    """``max_workers`` threads plus a wait queue of ``max_queue``; beyond: Overloaded."""

    def __init__(self, *, max_workers: int, max_queue: int, retry_after_s: int = 1,
                 telemetry: Telemetry | None = None) -> None:
        if max_workers < 1 or max_queue < 0:
            raise ValueError("max_workers must be >= 1 and max_queue >= 0")
        self.max_workers = max_workers
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.rejected = 0
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ballast-blocking")
        tel = telemetry or Telemetry()
        self._rejected_total: Counter = tel.counter("ballast_executor_rejected_total")
        # Read at scrape time: the counts live here, not in the exporter.
        tel.gauge("ballast_executor_in_use").sample(self.in_use)
        tel.gauge("ballast_executor_queued").sample(self.queued)

    def in_use(self) -> float:
        """Threads busy with blocking work now."""
        return min(self.in_flight, self.max_workers)

    def queued(self) -> float:
        """Callers waiting for a thread now."""
        return max(self.in_flight - self.max_workers, 0)

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        # Only the event loop thread touches in_flight, so no lock is needed.
        if self.in_flight >= self.max_workers + self.max_queue:
            self.rejected += 1
            self._rejected_total.inc()
            log.warning("bulkhead.rejected", in_flight=self.in_flight, max_workers=self.max_workers,
                        max_queue=self.max_queue)
            raise Overloaded(self.retry_after_s, internal="bulkhead full")
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        try:
            future = self._pool.submit(functools.partial(ctx.run, fn, *args))
        except RuntimeError:
            self.in_flight -= 1
            raise Overloaded(self.retry_after_s, internal="bulkhead shut down") from None
        # Counted until the thread is done, not until the caller stops waiting: a
        # cancelled caller does not free the thread its work still occupies.
        future.add_done_callback(lambda _: _call_soon(loop, self._release))
        return await asyncio.wrap_future(future, loop=loop)

    def _release(self) -> None:
        self.in_flight -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed: nobody is counting any more
        pass


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_executor(config: Config, telemetry: Telemetry) -> BoundedExecutor:
    s: Settings = config.plugin("bulkhead")
    return BoundedExecutor(max_workers=s.max_workers, max_queue=s.max_queue,
                           retry_after_s=s.retry_after_s, telemetry=telemetry)
