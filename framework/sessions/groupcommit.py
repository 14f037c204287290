"""Group commit and pooled reads for store adapters whose driver blocks (SQLite).

A durable write costs an fsync, and an fsync costs the same whether it covers one
mutation or thousands. So every write is queued to ONE writer thread; it takes whatever
has queued up, hands the group to the adapter's ``commit_group`` (one transaction) and
then answers every caller on its event loop. Under load many callers share each fsync;
when idle, a lone write is committed at once. Reads go to a few reader threads that
likewise answer every read already waiting with one wake-up of the event loop.

Both loops take their work the same way (:func:`take_batch`). What is NOT here is SQL:
the adapter supplies ``commit_group`` and the connections. The bookkeeping an adapter
of any driver needs (pending batches per session, drain waiters, the failure hook,
counters, a dead writer) lives in :class:`WriteQueue`.

A writer that dies (any exception, including ones that are not ``Exception``) answers
every caller it holds and every one queued after with a StoreError, records why in
``failure`` and refuses new writes at once: no caller waits forever, and readiness can
report the store as dead.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import structlog

from ballast.errors import BallastError, ClientError, StoreError
from ballast.sessions.commit_metrics import CommitMetrics

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C")  # a connection

#: Bounds of one group transaction: it must stay short enough that the first caller in
#: it is not kept waiting behind an unbounded backlog.
MAX_GROUP_MUTATIONS: Final = 20_000
MAX_GROUP_REQUESTS: Final = 512

#: Reads one reader thread answers with one wake-up of the event loop.
MAX_READ_BATCH: Final = 64

STOP: Final = object()


def store_error(exc: BaseException) -> StoreError:
    """Wrap a driver error: its text goes to the internal detail, never to a client."""
    err = StoreError(internal=f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def take_batch(q: queue.SimpleQueue[Any], first: Any,
               full: Callable[[list[Any]], bool]) -> tuple[list[Any], bool]:
    """``first`` plus whatever is already queued, until ``full(batch)`` or a STOP.

    Returns the batch and whether a STOP was taken (the loop ends after the batch).
    """
    batch = [first]
    while not full(batch):
        try:
            item = q.get_nowait()
        except queue.Empty:
            break
        if item is STOP:
            return batch, True
        batch.append(item)
    return batch, False


@dataclass(slots=True)
class WriterStats:
    """Counters of the writer, for benchmarks and tests (read them on the event loop)."""

    groups: int = 0
    requests: int = 0
    mutations: int = 0
    failed_requests: int = 0


@dataclass(slots=True, eq=False)
class Request(Generic[C]):
    """One queued write: what to apply, and whom to answer."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    key: Hashable  # the session (tenant, id) for appends; anything for other writes
    apply: Callable[[C], Any]
    session_id: str = ""
    mutations: list[dict[str, Any]] | None = None  # set for appends only
    weight: int = 1
    # The caller's context (appends only): a failure is reported in it, so its log
    # lines carry the request id of the request that sent the batch.
    context: contextvars.Context | None = None


@dataclass(slots=True, eq=False)
class Outcome:
    request: Request[Any]
    result: Any = None
    error: BaseException | None = None


#: ``commit_group(conn, group) -> outcomes``: apply a group in one transaction.
CommitGroup = Callable[[C, list[Request[C]]], list[Outcome]]
FailureHook = Callable[[str, list[dict[str, Any]], BaseException], None]


class WriteQueue(Generic[C]):
    """The queue in front of one writer, and everything callers need around it."""

    def __init__(self, on_failure: FailureHook | None = None,
                 metrics: CommitMetrics | None = None) -> None:
        self.on_failure = on_failure
        self.metrics = metrics or CommitMetrics()
        self.stats = WriterStats()
        self.failure: str | None = None
        self.closed = False
        self._queue: queue.SimpleQueue[Request[C] | object] = queue.SimpleQueue()
        self._pending: dict[Hashable, int] = {}
        self._drain_waiters: dict[Hashable, list[asyncio.Future[None]]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # orders a write against the writer's death

    # ------------------------------------------------------------------ event loop side

    def submit(self, key: Hashable, apply: Callable[[C], T], *, session_id: str = "",
               mutations: list[dict[str, Any]] | None = None) -> asyncio.Future[T]:
        """Queue a write. Synchronous on purpose: arrival order is call order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        weight = max(len(mutations), 1) if mutations is not None else 1
        context = contextvars.copy_context() if mutations is not None else None
        with self._lock:
            if self.failure is not None:
                raise StoreError(internal=f"the store writer has stopped: {self.failure}")
            if self.closed or self._thread is None:
                state = "closed" if self.closed else "not open"
                raise StoreError(internal=f"the store is {state}; the write was not queued.")
            self._queue.put(Request(loop, future, key, apply, session_id, mutations, weight, context))
        if mutations is not None:
            self._pending[key] = self._pending.get(key, 0) + 1
        return future

    def pending(self, key: Hashable) -> int:
        return self._pending.get(key, 0)

    async def drain(self, key: Hashable) -> None:
        if not self._pending.get(key):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.setdefault(key, []).append(waiter)
        await waiter

    def start(self, conn: C, commit_group: CommitGroup[C], close: Callable[[C], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(conn, commit_group, close),
                                        name="ballast-store-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking: let the writer commit what is queued, then end it."""
        with self._lock:
            self.closed = True
            self._queue.put(STOP)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    # ------------------------------------------------------------------ writer thread

    def _full(self, group: list[Request[C]]) -> bool:
        return (len(group) >= MAX_GROUP_REQUESTS
                or sum(r.weight for r in group) >= MAX_GROUP_MUTATIONS)

    def _run(self, conn: C, commit_group: CommitGroup[C], close: Callable[[C], None]) -> None:
        group: list[Request[C]] = []
        try:
            while True:
                first = self._queue.get()
                if first is STOP:
                    break
                group, stop = take_batch(self._queue, first, self._full)
                outcomes = commit_group(conn, group)
                group = []
                self.settle(outcomes)
                if stop:
                    break
        except BaseException as exc:  # a dead writer must still answer everyone
            with self._lock:
                self.failure = type(exc).__name__
            log.critical("store.writer_failed", error_type=type(exc).__name__, error=str(exc))
            dead = StoreError(internal=f"the store writer stopped: {type(exc).__name__}")
            # Its group may or may not have committed: the callers get an error, which
            # the API documents as "possibly stored, retry with the same ids".
            self.settle([Outcome(r, error=dead) for r in group])
        finally:
            try:
                close(conn)
            except Exception:  # closing a broken connection may fail too
                pass
            self._answer_left()

    def _answer_left(self) -> None:
        """Answer any write still queued (one racing close(), or behind a dead writer)."""
        with self._lock:
            self.closed = True
        left: list[Outcome] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                closed = StoreError(internal="the store was closed before the write ran.")
                left.append(Outcome(item, error=closed))
        if left:
            self.settle(left)

    def settle(self, outcomes: list[Outcome]) -> None:
        """Hand the outcomes to the event loop(s) that are waiting for them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.request.loop, []).append(outcome)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._resolve, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    # ------------------------------------------------------------------ back on the loop

    def _resolve(self, outcomes: list[Outcome]) -> None:
        """Answer each caller, notify failures, wake drainers."""
        stats = self.stats
        stats.groups += 1
        drained: list[Hashable] = []
        for outcome in outcomes:
            request, error = outcome.request, outcome.error
            stats.requests += 1
            if request.mutations is not None:
                left = self._pending.get(request.key, 1) - 1
                if left > 0:
                    self._pending[request.key] = left
                else:
                    self._pending.pop(request.key, None)
                    drained.append(request.key)
            future = request.future
            if error is None:
                if request.mutations is not None:
                    stats.mutations += len(request.mutations)
                if not future.done():
                    future.set_result(outcome.result)
                continue
            if isinstance(error, ClientError):
                exc: BaseException = error
            else:
                stats.failed_requests += 1
                exc = error if isinstance(error, StoreError) else store_error(error)
                if request.mutations is not None:
                    if request.context is None:
                        self._notify_failure(request.session_id, request.mutations, error)
                    else:
                        request.context.run(self._notify_failure, request.session_id,
                                            request.mutations, error)
            if not future.done():
                future.set_exception(exc)
        self.metrics.committed(o.result for o in outcomes if o.error is None)
        for key in drained:
            for waiter in self._drain_waiters.pop(key, []):
                if not waiter.done():
                    waiter.set_result(None)

    def _notify_failure(self, session_id: str, mutations: list[dict[str, Any]], error: BaseException) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(session_id, mutations, error)
        except Exception as hook_error:  # a broken hook must not stop the queue
            log.error(
                "store.failure_hook_failed",
                session_id=session_id,
                error_type=type(hook_error).__name__,
                error=str(hook_error),
            )


# ---------------------------------------------------------------------- reads


@dataclass(slots=True, eq=False)
class _Read(Generic[C]):
    """One queued read: what to run on a read connection, and whom to answer."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    run: Callable[[C], Any]


_ReadAnswer = tuple[_Read[Any], Any, BaseException | None]


class ReadPool(Generic[C]):
    """A few reader threads, each with its own connection, sharing one queue.

    A thread hop costs more than the database work of a point read, so a reader takes
    every read that is already waiting (up to :data:`MAX_READ_BATCH`) and answers all
    of them with one wake-up of the event loop.
    """

    def __init__(self, connect: Callable[[], C], close: Callable[[C], None], workers: int) -> None:
        self._connect = connect
        self._close = close
        self._queue: queue.SimpleQueue[_Read[C] | object] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"ballast-store-read-{i}", daemon=True)
            for i in range(workers)
        ]
        self.closed = False

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, run: Callable[[C], T]) -> asyncio.Future[T]:
        if self.closed:
            raise StoreError(internal="the store is closed; the read was not run.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Read(loop, future, run))
        return future

    def stop(self) -> None:
        """Stop and join every reader (blocking); reads already queued are answered."""
        self.closed = True
        for _ in self._threads:
            self._queue.put(STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _serve(self) -> None:
        conn: C | None = None
        try:
            while True:
                first = self._queue.get()
                if first is STOP:
                    return
                batch, stop = take_batch(self._queue, first, lambda b: len(b) >= MAX_READ_BATCH)
                answers: dict[asyncio.AbstractEventLoop, list[_ReadAnswer]] = {}
                for read in batch:
                    answer: _ReadAnswer
                    try:
                        if conn is None:
                            conn = self._connect()
                        answer = (read, read.run(conn), None)
                    except BaseException as exc:  # any error: the caller gets it; the reader goes on
                        answer = (read, None, exc)
                    answers.setdefault(read.loop, []).append(answer)
                for loop, results in answers.items():
                    try:
                        loop.call_soon_threadsafe(_answer_reads, results)
                    except RuntimeError:  # the loop is closed: nobody is waiting any more
                        pass
                if stop:
                    return
        finally:
            if conn is not None:
                self._close(conn)


def _answer_reads(results: list[_ReadAnswer]) -> None:
    for read, result, error in results:
        if read.future.done():
            continue
        if error is None:
            read.future.set_result(result)
        elif isinstance(error, BallastError):
            read.future.set_exception(error)
        else:
            read.future.set_exception(store_error(error))
