"""timeout_budget: every request and every finalize job runs against a deadline.

* Requests: each handler runs under ``request_ms``; past it the handler is cancelled and
  the client gets a 504 problem. For a request that writes, the 504 says the write may
  still have been stored and names the retry-safe path (the same mutation ids).
* Finalize: each job runs under ``finalize_ms``. The deadline is checked by the core
  before every stage and enforced inside a stage by cancellation, so a hung upstream call
  in the report stage ends when the budget does; the job ends ``timed_out``.
* Both deadlines are put in force (:mod:`ballast.budget`), so upstream calls and
  their retries can use only what is left.

Disabled: no request or job has a deadline; upstream calls are bounded only by their
per-attempt timeout and the retry policy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType

from aiohttp import web
from pydantic import Field

from ballast import budget
from ballast.budget import TIMER_SLACK_S, Deadline
from ballast.config import Config, PluginSection
from ballast.errors import BudgetExceeded, UpstreamError
from ballast.hookspecs import hookimpl
from ballast.jobs import JobContext, JobRun, StageWrapper
from ballast.middleware import Handler, Middleware, MiddlewareSpec

ORDER = 200

#: The 504 detail of a request that may write: the write can still commit after the
#: budget ran out (it was already queued), so the client must not assume it did not.
WRITE_TIMEOUT_DETAIL = (
    "The request did not complete within its time budget, but its change may still have "
    "been stored. Retrying is safe: send the same mutations with the same ids (a repeated "
    "id is not applied twice); a repeated finalize returns the job already started; a "
    "repeated create answers 409 if the session was stored."
)
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Settings(PluginSection):
    request_ms: int = Field(30_000, ge=1, le=3_600_000, description="budget of one request handler")
    finalize_ms: int = Field(120_000, ge=1, le=86_400_000, description="budget of one finalize job")


class enforced:
    """``async with enforced(deadline, describe):`` run the block until ``deadline``; past
    it, cancel the block and raise BudgetExceeded (``describe()`` is its internal detail).

    Upstream attempts are cut to the time left, so an upstream call usually notices the
    end of the budget a moment before the timeout fires and fails first: an upstream
    failure once the deadline has passed is the budget running out too.

    A class rather than an ``@asynccontextmanager`` generator: it wraps every request,
    and an async generator per request (with the event loop's bookkeeping of each one)
    cost more than the handler of a simple read.
    """

    __slots__ = ("_deadline", "_describe", "_timeout")

    def __init__(self, deadline: Deadline, describe: Callable[[], str]) -> None:
        self._deadline = deadline
        self._describe = describe
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._timeout = asyncio.timeout(max(self._deadline.remaining(), 0.0))
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        timeout = self._timeout
        assert timeout is not None, "enforced: __aexit__ without __aenter__"
        try:
            await timeout.__aexit__(exc_type, exc, tb)  # turns its own cancellation into TimeoutError
        except TimeoutError:
            if timeout.expired():
                raise BudgetExceeded(internal=self._describe()) from None
            raise
        if isinstance(exc, TimeoutError):
            if timeout.expired():
                raise BudgetExceeded(internal=self._describe()) from None
        elif isinstance(exc, UpstreamError) and self._deadline.spent():
            raise BudgetExceeded(internal=self._describe()) from exc


class Watchdog:
    """Cancels requests that outlive their deadline, with one sweep timer for them all.

    A timer per request (``asyncio.timeout``) costs a heap push and a cancel on every
    request, which showed as a fifth of a simple read's CPU. Requests instead register
    their task and deadline in a dict, and one timer sweeps it every ``interval_s`` while
    anything is in flight: a request is cancelled at most ``interval_s`` after its
    deadline, a negligible slack against budgets of seconds.

    The same dict is where the request's deadline is found (:func:`ballast.budget.current`
    consults it), so a request puts its deadline in force without a context variable.
    """

    __slots__ = ("__weakref__", "_expired", "_handle", "_inflight", "budget_s", "interval_s")

    def __init__(self, interval_s: float = 0.05, budget_s: float = 0.0) -> None:
        self.interval_s = interval_s
        self.budget_s = budget_s  # the budget a registered deadline was taken from
        self._inflight: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._handle: asyncio.TimerHandle | None = None
        budget.register_task_deadlines(self)

    def watch(self, task: asyncio.Task[object], deadline: Deadline) -> None:
        self.watch_until(task, deadline.at)

    def watch_until(self, task: asyncio.Task[object], at: float) -> None:
        """Cancel ``task`` once ``time.monotonic()`` passes ``at``, unless released first."""
        self._inflight[task] = at
        if self._handle is None:
            self.arm()

    def arm(self) -> None:
        """Start the sweep timer (it stops by itself when nothing is in flight)."""
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._sweep)

    def release(self, task: asyncio.Task[object]) -> bool:
        """Stop watching ``task``; True if the watchdog cancelled it (now uncancelled)."""
        self._inflight.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
            return True
        return False

    def deadline_of(self, task: asyncio.Task[object]) -> Deadline | None:
        at = self._inflight.get(task)
        return None if at is None else Deadline(at, self.budget_s)

    def _sweep(self) -> None:
        now = time.monotonic()
        late = [task for task, at in self._inflight.items() if at <= now]
        for task in late:
            del self._inflight[task]
            self._expired.add(task)
            task.cancel()
        self._handle = (asyncio.get_running_loop().call_later(self.interval_s, self._sweep)
                        if self._inflight else None)


def request_budget(*, request_ms: int, watchdog: Watchdog | None = None) -> Middleware:
    if request_ms < 1:
        raise ValueError("request_ms must be >= 1")
    seconds = request_ms / 1000
    dog = watchdog or Watchdog(budget_s=seconds)
    if not dog.budget_s:
        dog.budget_s = seconds
    clock = time.monotonic

    def exceeded(request: web.Request) -> BudgetExceeded:
        detail = None if request.method in _READ_METHODS else WRITE_TIMEOUT_DETAIL
        return BudgetExceeded(detail, internal=f"{request.method} {request.path} exceeded "
                                               f"its {request_ms} ms budget")

    # The watchdog's table, used in place (its watch/release, inlined: every request).
    inflight = dog._inflight
    expired = dog._expired
    current_task = asyncio.current_task
    scope_var = budget._current

    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = current_task()
        assert task is not None, "a request handler runs in a task"
        at = clock() + seconds
        # An earlier deadline already in force (a scope around this request) still wins.
        outer = scope_var.get()
        if isinstance(outer, Deadline) and outer.at < at:
            at = outer.at
        inflight[task] = at  # also puts the deadline in force for this task
        if dog._handle is None:
            dog.arm()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if dog.release(task):
                raise exceeded(request) from None
            raise
        except UpstreamError as exc:
            if at - clock() <= TIMER_SLACK_S:  # spent: the budget ran out, not the upstream
                raise exceeded(request) from exc
            raise
        finally:
            inflight.pop(task, None)
            if expired and task in expired:  # cancelled by the sweep, but ended otherwise
                expired.discard(task)
                task.uncancel()

    return impl


def finalize_budget(*, finalize_ms: int) -> StageWrapper:
    if finalize_ms < 1:
        raise ValueError("finalize_ms must be >= 1")
    seconds = finalize_ms / 1000

    def wrap(run: JobRun) -> JobRun:
        async def budgeted(job: JobContext) -> None:
            job.deadline = Deadline.after(seconds)
            async with enforced(job.deadline, lambda: f"finalize exceeded its {finalize_ms} ms "
                                                      f"budget in stage {job.current}"):
                await run(job)

        return budgeted

    return wrap


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_middlewares(config: Config) -> list[MiddlewareSpec]:
    s: Settings = config.plugin("timeout_budget")
    return [MiddlewareSpec("timeout_budget", ORDER, request_budget(request_ms=s.request_ms))]


@hookimpl
def ballast_finalize_wrappers(config: Config) -> list[StageWrapper]:
    s: Settings = config.plugin("timeout_budget")
    return [finalize_budget(finalize_ms=s.finalize_ms)]
