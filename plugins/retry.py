"""retry: outbound upstream calls that survive transient failures without outliving their budget.

Inference upstreams fail transiently (429 rate limits, 502/503 from a busy gateway,
hung or reset connections), and a single attempt turns each of those blips into a
failed request. This plugin supplies the upstream call (hook ``ballast_upstream_call``)
that retries them, through aiohttp-retry's ``RetryClient``:

* **What is retried**: the statuses in ``statuses`` (default 429, 502, 503), timeouts
  (``asyncio.TimeoutError``, ``aiohttp.ServerTimeoutError``) and connection failures
  (``aiohttp.ClientConnectionError``, ``ServerDisconnectedError``,
  ``ClientPayloadError``), except TLS errors, which do not heal. Nothing else: a 400,
  401, 403, 404, 422 or any other status is returned at once, as an
  :class:`~ballast.upstream.UpstreamResponse`, for the caller to handle.
* **How long it waits**: exponential backoff, ``start_timeout_s * factor ** (n - 1)``
  after the n-th failed attempt, capped at ``max_timeout_s``, with *equal jitter*: the
  wait is drawn uniformly from ``[d/2, d]`` for the computed delay ``d``. Equal rather
  than full jitter keeps at least half the backoff, so a struggling upstream never gets
  an immediate retry, while still spreading out clients that failed together. A
  ``Retry-After`` header (delta-seconds or HTTP-date) on a retried response replaces
  the backoff, cut to ``max_retry_after_s``.
* **The time budget** (:mod:`ballast.budget`): each attempt's timeout is
  :func:`ballast.upstream.attempt_timeout`, the smaller of the per-attempt timeout
  and the time left, and it covers reading the whole body (a body that dribbles past it
  is a timeout). A wait that would reach the end of the budget is not slept at all: the
  call fails at once with ``kind="budget"``. So ``Retry-After: 3600`` under any budget
  of less than ``max_retry_after_s`` fails immediately instead of sleeping.

The final failure is logged as ``upstream.failed`` and raised as
:class:`~ballast.errors.UpstreamError` with ``kind`` one of ``status`` (retried
statuses to the last attempt), ``timeout``, ``connection`` or ``budget`` (the budget
ran out, or the next wait would outlast it); ``upstream_status`` and ``error_type``
tell what the last attempt saw. Each retry is logged as ``upstream.retry`` at warning
level. Neither line carries headers or the URL, so the API key cannot leak through
them; aiohttp-retry's own logging is silenced for the same reason (it reprs exceptions,
and some aiohttp exceptions carry the request's headers).

How aiohttp-retry 2.9 is bent to these rules (read its ``client.py``):

* ``RetryClient.close()`` closes the session it was given, whoever created it, and so
  does ``async with RetryClient(...)``. A ``RetryClient`` is therefore made per call
  around the provider's session and never closed; only a per-call session from a
  provider with ``owns_sessions`` is closed, by this module, after the call.
* The retry policy is a ``RetryOptionsBase`` subclass made per call. Its
  ``get_timeout(attempt, response)`` is where the wait is decided: it sees the retried
  response (for ``Retry-After``) or, called inside aiohttp-retry's ``except`` block,
  the exception. To stop without sleeping it raises a private exception, which
  aiohttp-retry does not retry and lets through; this module turns it into
  ``UpstreamError``.
* aiohttp-retry drops a retried response without releasing it; ``get_timeout``
  releases it before the sleep, so its connection is not held while waiting.
* aiohttp-retry sends attempt n with ``params_list[n - 1]``, read right before the
  attempt is sent. The list given here builds that entry when it is read, so the
  attempt's timeout is computed after the wait, from the budget left at that moment,
  and an attempt with no time left is refused before it is sent.
* Bodies are read inside the attempt: for attempts that may still be retried, in
  aiohttp-retry's ``evaluate_response_callback`` (a read that fails or times out is
  then retried like any other failure); on the last attempt, after aiohttp-retry
  returns, still under that attempt's timeout.

Disabled: each upstream call makes exactly one attempt.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, SupportsIndex, overload

import aiohttp
from aiohttp_retry import RequestParams, RetryClient, RetryOptionsBase
from pydantic import Field, field_validator
from yarl import URL

from ballast import budget
from ballast.config import Config, PluginSection
from ballast.errors import UpstreamError
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger
from ballast.telemetry import Counter, Telemetry
from ballast.upstream import (
    ClientProvider,
    UpstreamRequest,
    UpstreamResponse,
    attempt_outcome,
    attempt_timeout,
    upstream_label,
)

log = get_logger("ballast.retry")

#: Failures of an attempt that another attempt may not repeat.
RETRIED_EXCEPTIONS: tuple[type[Exception], ...] = (
    TimeoutError,  # asyncio.TimeoutError is TimeoutError since Python 3.11
    aiohttp.ServerTimeoutError,
    aiohttp.ClientConnectionError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientPayloadError,
)

#: Connection failures that another attempt would only repeat.
NEVER_RETRIED_EXCEPTIONS: tuple[type[Exception], ...] = (aiohttp.ClientSSLError,)

_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


class Settings(PluginSection):
    attempts: int = Field(
        default=3, ge=1, le=20,
        description="attempts in all, the first included (1: no retry)")
    start_timeout_s: float = Field(
        default=0.5, ge=0, le=60,
        description="backoff before the second attempt, in seconds")
    factor: float = Field(
        default=2.0, ge=1, le=10,
        description="each further backoff is this many times the previous one")
    max_timeout_s: float = Field(
        default=5.0, ge=0, le=300,
        description="cap on one backoff, in seconds")
    jitter: bool = Field(
        default=True,
        description="draw each backoff from [d/2, d] (equal jitter) instead of waiting exactly d")
    statuses: list[int] = Field(
        default=[429, 502, 503],
        description="upstream statuses that are retried; any other is returned at once")
    max_retry_after_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="a longer Retry-After is cut to this many seconds")
    attempt_timeout_s: float | None = Field(
        default=None, gt=0, le=600,
        description="per-attempt timeout in seconds; unset: the request's own (inference.timeout_ms)")

    @field_validator("statuses")
    @classmethod
    def _error_statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 400 <= s <= 599]
        if bad:
            raise ValueError(f"only error statuses (400-599) can be retried, not {bad}")
        return sorted(set(value))


# --------------------------------------------------------------------------------------
# the wait between attempts
# --------------------------------------------------------------------------------------


def backoff_delay(failed_attempt: int, *, start_s: float, factor: float, cap_s: float,
                  jitter: bool = True, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after attempt ``failed_attempt`` (1-based) failed.

    ``d = min(cap_s, start_s * factor ** (failed_attempt - 1))``; with ``jitter`` the
    result is drawn from ``[d/2, d]`` (equal jitter, ``rng`` in ``[0, 1)``), so it is
    always within ``[0, d]``.
    """
    try:
        delay = min(cap_s, start_s * factor ** max(failed_attempt - 1, 0))
    except OverflowError:  # factor ** n beyond float range: far past any cap
        delay = cap_s if start_s > 0 else 0.0
    if jitter:
        delay = delay / 2 + min(max(rng(), 0.0), 1.0) * delay / 2
    return max(delay, 0.0)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or ``None`` if absent or unreadable.

    Accepts delta-seconds (``"120"``; a decimal fraction is tolerated) and an HTTP-date
    (a date in the past means no wait). A negative number or anything else is ignored
    (``None``), and the caller falls back to its backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with no claim about the local zone
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


# --------------------------------------------------------------------------------------
# one logical call
# --------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends the call at once: raised instead of a wait, or instead of an attempt.

    Not one of the retried exceptions, so aiohttp-retry lets it through.
    """

    def __init__(self, kind: str, why: str, status: int | None, error: BaseException | None) -> None:
        super().__init__(why)
        self.kind = kind
        self.why = why
        self.status = status
        self.error = error


class _Quiet:
    """aiohttp-retry's logger, silenced: see the module docstring."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        return None


_QUIET = _Quiet()


async def _read_body(response: aiohttp.ClientResponse) -> bool:
    """aiohttp-retry's response callback for statuses it will not retry: read the body.

    Reading here, inside the attempt, makes a failed or timed-out body read a failure
    of this attempt, which is retried. Returns True: "do not retry this response".
    """
    await response.read()
    return True


class _Instruments:
    """The upstream counters, taken once per app at build."""

    __slots__ = ("attempts", "calls", "denied", "retries")

    def __init__(self, telemetry: Telemetry) -> None:
        self.calls: Counter = telemetry.counter("ballast_upstream_calls_total")
        self.attempts: Counter = telemetry.counter("ballast_upstream_attempts_total")
        self.retries: Counter = telemetry.counter("ballast_upstream_retries_total")
        self.denied: Counter = telemetry.counter("ballast_upstream_retries_denied_total")


class _CallPolicy(RetryOptionsBase):
    """The retry policy of one call, with that call's state (attempts sent, last failure)."""

    def __init__(self, request: UpstreamRequest, settings: Settings,
                 rng: Callable[[], float], instruments: _Instruments) -> None:
        super().__init__(
            attempts=settings.attempts,
            statuses=set(settings.statuses),
            exceptions=set(RETRIED_EXCEPTIONS),
            retry_all_server_errors=False,
            evaluate_response_callback=_read_body,
        )
        self.request = request
        self.settings = settings
        self.rng = rng
        self.metrics = instruments
        self.upstream = upstream_label(request)
        #: Attempts actually started.
        self.sent = 0
        #: What the last retried attempt saw: its status, or its exception.
        self.last_status: int | None = None
        self.last_error: BaseException | None = None

    def attempt_params(self) -> RequestParams:
        """The next attempt's parameters, its timeout cut to the budget left now."""
        try:
            timeout = attempt_timeout(self.request)
        except UpstreamError as exc:
            if self.sent:
                self.metrics.denied.inc(self.upstream, "budget")
            raise _Stop("budget", "no time left for another attempt", self.last_status,
                        self.last_error) from exc
        if self.sent:
            self.metrics.retries.inc(self.upstream, attempt_outcome(self.last_status, self.last_error))
        self.sent += 1
        return RequestParams(
            method=self.request.method,
            url=self.request.url,
            headers=dict(self.request.headers),
            kwargs={"json": self.request.json, "timeout": timeout},
        )

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        """Decide the wait after failed attempt ``attempt``, or raise :class:`_Stop`."""
        status: int | None = None
        error: BaseException | None = None
        retry_after: float | None = None
        if response is not None:
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            response.release()  # aiohttp-retry would hold it, and its connection, while we sleep
        else:
            # aiohttp-retry calls this from inside its ``except`` block for the failure.
            error = sys.exc_info()[1]
        # Every attempt that may be retried ends here; the last one in RetryingCall._send.
        self.metrics.attempts.inc(self.upstream, attempt_outcome(status, error))
        if response is None and isinstance(error, NEVER_RETRIED_EXCEPTIONS):
            raise _Stop("connection", "not worth retrying", None, error)
        self.last_status, self.last_error = status, error

        s = self.settings
        if retry_after is not None:
            delay = min(retry_after, s.max_retry_after_s)
        else:
            delay = backoff_delay(attempt, start_s=s.start_timeout_s, factor=s.factor,
                                  cap_s=s.max_timeout_s, jitter=s.jitter, rng=self.rng)
        left = budget.remaining()
        if left is not None and delay >= left:
            self.metrics.denied.inc(self.upstream, "budget")
            raise _Stop("budget", f"next wait of {delay:.3f}s outlasts the {max(left, 0):.3f}s left",
                        status, error)
        log.warning("upstream.retry", name=self.request.name, attempt=attempt, status=status,
                    error_type=_type_name(error), delay_ms=_ms(delay),
                    remaining_ms=None if left is None else _ms(max(left, 0.0)))
        return delay


class _AttemptParams(list[RequestParams]):
    """``params_list`` for aiohttp-retry whose entries are built when they are read.

    aiohttp-retry reads attempt n's parameters (``params_list[n - 1]``) right before it
    sends that attempt, after the wait before it; see the module docstring.
    """

    def __init__(self, policy: _CallPolicy) -> None:
        # One placeholder entry: aiohttp-retry insists that the list is not empty.
        super().__init__([RequestParams(method=policy.request.method, url=policy.request.url)])
        self._policy = policy

    @overload
    def __getitem__(self, index: SupportsIndex, /) -> RequestParams: ...

    @overload
    def __getitem__(self, index: slice, /) -> list[RequestParams]: ...

    def __getitem__(self, index: SupportsIndex | slice, /) -> RequestParams | list[RequestParams]:
        if isinstance(index, slice):
            return super().__getitem__(index)
        return self._policy.attempt_params()


class RetryingCall:
    """The upstream call this plugin supplies: ``await call(request) -> UpstreamResponse``."""

    def __init__(self, provider: ClientProvider, settings: Settings | None = None, *,
                 rng: Callable[[], float] = random.random, telemetry: Telemetry | None = None) -> None:
        self.provider = provider
        self.settings = settings or Settings()
        self._rng = rng
        self._metrics = _Instruments(telemetry or Telemetry())

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        if self.settings.attempt_timeout_s is not None:
            request = dataclasses.replace(request, attempt_timeout_s=self.settings.attempt_timeout_s)
        session = await self.provider.session()
        try:
            return await self._send(session, request)
        finally:
            if self.provider.owns_sessions:
                await session.close()

    async def _send(self, session: aiohttp.ClientSession, request: UpstreamRequest) -> UpstreamResponse:
        policy = _CallPolicy(request, self.settings, self._rng, self._metrics)
        # Never closed, never used as a context manager: either would close ``session``.
        client = RetryClient(client_session=session, logger=_QUIET, retry_options=policy)
        try:
            async with client.requests(_AttemptParams(policy)) as response:
                if response.status in self.settings.statuses:
                    response.release()
                    self._metrics.attempts.inc(policy.upstream, "status")
                    raise self._failed(policy, "status", f"answered {response.status}",
                                       status=response.status)
                body = await response.read()  # the last attempt: still under its timeout
                outcome = attempt_outcome(response.status, None)
                self._metrics.attempts.inc(policy.upstream, outcome)
                self._metrics.calls.inc(policy.upstream, outcome)
                return UpstreamResponse(response.status, dict(response.headers), body,
                                        attempts=policy.sent)
        except _Stop as stop:
            raise self._failed(policy, stop.kind, stop.why, status=stop.status,
                               error=stop.error) from (stop.error or stop.__cause__)
        except TimeoutError as exc:
            # Only the last attempt's failure gets here (earlier ones went to get_timeout).
            self._metrics.attempts.inc(policy.upstream, "timeout")
            raise self._failed(policy, "timeout", "timed out", error=exc) from exc
        except aiohttp.ClientError as exc:
            self._metrics.attempts.inc(policy.upstream, "connection")
            raise self._failed(policy, "connection", f"{type(exc).__name__}: {exc}",
                               error=exc) from exc

    def _failed(self, policy: _CallPolicy, kind: str, why: str, *, status: int | None = None,
                error: BaseException | None = None) -> UpstreamError:
        """Log ``upstream.failed`` and build the error to raise."""
        request = policy.request
        self._metrics.calls.inc(policy.upstream, kind)
        log.error("upstream.failed", name=request.name, attempts=policy.sent, kind=kind,
                  status=status, error_type=_type_name(error))
        return UpstreamError(
            kind=kind, upstream_status=status, attempts=policy.sent,
            internal=f"{request.name} ({_path(request.url)}): gave up after "
                     f"{policy.sent} attempt(s): {why}")


def _type_name(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _path(url: str) -> str:
    """The URL's path only: no host, no query (which could hold a key)."""
    try:
        return URL(url).path or "/"
    except (TypeError, ValueError):
        return "?"


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_upstream_call(config: Config, provider: ClientProvider, telemetry: Telemetry) -> RetryingCall:
    return RetryingCall(provider, config.plugin("retry"), telemetry=telemetry)
