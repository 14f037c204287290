"""The outbound HTTP path to inference upstreams.

Three replaceable parts, composed once when the app is built:

* a :class:`ClientProvider` hands out the ``aiohttp.ClientSession`` to send with (the
  ``shared_client`` plugin provides one shared, lazily created session; without it each
  call gets a short-lived session of its own);
* an :data:`UpstreamCall` sends one logical request and returns the whole response (the
  core's default makes exactly one attempt; the ``retry`` plugin supplies one that
  retries);
* wrappers (:data:`UpstreamWrapper`) around that call, outermost first.

Every attempt's timeout is the smaller of the configured per-attempt timeout and the
time left in the current budget (:mod:`ballast.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from ballast import budget
from ballast.errors import UpstreamError
from ballast.telemetry import Reason, Telemetry


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One logical outbound request. ``name`` is a stable label for logs (no host)."""

    method: str
    url: str
    name: str = "upstream"
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    attempt_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A fully read response: the body is read inside the attempt's timeout."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 1


UpstreamCall = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]
UpstreamWrapper = Callable[[UpstreamCall], UpstreamCall]


class ClientProvider(Protocol):
    """Hands out the client session to send with; closed once on shutdown."""

    async def session(self) -> aiohttp.ClientSession: ...

    @property
    def owns_sessions(self) -> bool:
        """True when each session handed out must be closed by the caller after use."""
        ...

    async def close(self) -> None: ...


class PerCallClientProvider:
    """The fallback without a shared client: a fresh session per call, closed after it.

    Safe under concurrency, but pays a connection set-up per call.
    """

    owns_sessions = True

    async def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def close(self) -> None:
        return None


def attempt_timeout(request: UpstreamRequest) -> aiohttp.ClientTimeout:
    """The timeout for one attempt: per-attempt limit, cut to the budget left."""
    total = budget.bounded(request.attempt_timeout_s)
    if total is not None and total <= 0:
        raise UpstreamError(kind="budget", internal=f"{request.name}: no time budget left for an attempt",
                            attempts=0)
    # aiohttp rounds timeouts of 5 s and more up to a whole second of loop time, which
    # could run an attempt past the budget: never round.
    return aiohttp.ClientTimeout(total=total, ceil_threshold=math.inf)


async def send_once(session: aiohttp.ClientSession, request: UpstreamRequest) -> UpstreamResponse:
    """One attempt: send, read the whole body within the attempt timeout, classify errors."""
    timeout = attempt_timeout(request)
    try:
        async with session.request(request.method, request.url, json=request.json,
                                   headers=dict(request.headers), timeout=timeout) as resp:
            body = await resp.read()
            return UpstreamResponse(resp.status, dict(resp.headers), body)
    except TimeoutError as exc:
        raise UpstreamError(kind="timeout", internal=f"{request.name}: attempt timed out") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(kind="connection",
                            internal=f"{request.name}: {type(exc).__name__}: {exc}") from exc


def upstream_label(request: UpstreamRequest) -> str:
    """The ``upstream`` metric label of a request: its name's first part ("inference")."""
    return request.name.partition(".")[0] or "upstream"


def attempt_outcome(status: int | None, error: BaseException | None) -> str:
    """How one attempt ended, as a metric label: ``ok`` or a :class:`~ballast.telemetry.Reason`.

    A response is ``ok`` unless it is a 429 or a 5xx (``status``); an exception is a
    ``timeout`` or, for anything else, a ``connection`` failure.
    """
    if error is not None:
        if isinstance(error, UpstreamError):
            return error.kind
        return Reason.TIMEOUT if isinstance(error, TimeoutError) else Reason.CONNECTION
    if status is not None and (status == 429 or status >= 500):
        return Reason.STATUS
    return "ok"


def single_attempt_call(provider: ClientProvider, telemetry: Telemetry | None = None) -> UpstreamCall:
    """The core's default upstream call: exactly one attempt, no retry."""
    tel = telemetry or Telemetry()
    calls = tel.counter("ballast_upstream_calls_total")
    attempts = tel.counter("ballast_upstream_attempts_total")

    async def call(request: UpstreamRequest) -> UpstreamResponse:
        session = await provider.session()
        try:
            response = await send_once(session, request)
        except UpstreamError as exc:
            if exc.kind != Reason.BUDGET:  # refused before it was sent: no attempt
                attempts.inc(upstream_label(request), exc.kind)
            calls.inc(upstream_label(request), exc.kind)
            raise
        finally:
            if provider.owns_sessions:
                await session.close()
        outcome = attempt_outcome(response.status, None)
        attempts.inc(upstream_label(request), outcome)
        calls.inc(upstream_label(request), outcome)
        return response

    return call


def compose(call: UpstreamCall, wrappers: list[UpstreamWrapper]) -> UpstreamCall:
    """Apply wrappers so that ``wrappers[0]`` is the outermost."""
    for wrap in reversed(wrappers):
        call = wrap(call)
    return call


class Upstream:
    """What the rest of the app holds: the composed call plus the provider behind it."""

    def __init__(self, call: UpstreamCall, provider: ClientProvider) -> None:
        self.call = call
        self.provider = provider

    async def request(self, request: UpstreamRequest) -> UpstreamResponse:
        return await self.call(request)

    async def close(self) -> None:
        await self.provider.close()


def response_error(request: UpstreamRequest, response: UpstreamResponse) -> UpstreamError:
    """The typed error for a final non-2xx response."""
    return UpstreamError(kind="status", upstream_status=response.status, attempts=response.attempts,
                         internal=f"{request.name}: upstream answered {response.status}")


__all__ = [
    "ClientProvider",
    "PerCallClientProvider",
    "Upstream",
    "UpstreamCall",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamWrapper",
    "attempt_outcome",
    "attempt_timeout",
    "compose",
    "response_error",
    "send_once",
    "single_attempt_call",
    "upstream_label",
]

