"""Blocking work of a background job waits for executor capacity; a request's does not.

The executor for blocking work may be bounded (the bulkhead plugin): when it is full,
a request is refused at once (503 + ``Retry-After``) and its client retries. A finalize
job has no client to retry for it, so its blocking work (its own stages, and what the
inference provider does for it: naming speakers, building the report) waits for
capacity instead, with backoff, for as long as its time budget lasts.

Which one a call is follows the context: the service starts each job's task inside
:func:`patient`, and the task inherits that, down to the provider's ``run_blocking``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ballast.executor import BlockingExecutor
from ballast.inference import RunBlocking
from ballast.sessions.finalize import until_capacity

_patient: contextvars.ContextVar[bool] = contextvars.ContextVar("ballast_patient", default=False)


@contextmanager
def patient() -> Iterator[None]:
    """Blocking work started in this block (and in tasks created in it) waits for room."""
    token = _patient.set(True)
    try:
        yield
    finally:
        _patient.reset(token)


def run_blocking_for(executor: BlockingExecutor) -> RunBlocking:
    """The ``run_blocking`` of inference providers: patient inside a job, else not."""

    async def run(fn: Callable[..., Any], /, *args: Any) -> Any:
        if _patient.get():
            return await until_capacity(lambda: executor.run(fn, *args))
        return await executor.run(fn, *args)

    return run
