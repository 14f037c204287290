"""retry: outbound upstream calls that survive transient failures without making outages worse.

Inference upstreams fail transiently (429 rate limits, 502/503 from a busy gateway,
hung or reset connections), and a single attempt turns each of those blips into a
failed request. But an upstream that is down for good gets every retry as extra load,
exactly when it can least take it. This plugin supplies the upstream call (hook
``ballast_upstream_call``) that retries, bounded per call *and* across calls:

* **What is retried**: the statuses in ``statuses`` (default 429, 502, 503), timeouts
  and connection failures (attempt errors marked retryable by the send), except TLS
  errors, which do not heal. Nothing else: any other status is returned at once, as an
  :class:`~ballast.upstream.UpstreamResponse`, for the caller to handle; a redirect or
  an oversized body fails at once. An attempt refused locally (circuit open,
  cooldown: :class:`~ballast.resilience.UpstreamRefused`) was never sent and ends the
  call: retrying it would only be refused again.
* **How long it waits**: exponential backoff, ``start_timeout_s * factor ** (n - 1)``
  after the n-th failed attempt, capped at ``max_timeout_s``, with *equal jitter*: the
  wait is drawn uniformly from ``[d/2, d]``. A ``Retry-After`` header (delta-seconds or
  HTTP-date) on a retried response replaces the backoff, cut to ``max_retry_after_s``.
* **The time budget** (:mod:`ballast.budget`): each attempt's timeout is the smaller of
  the per-attempt timeout and the time left, and covers reading the body. A wait that
  would reach the end of the budget is not slept: the call fails at once with
  ``kind="budget"``.
* **The retry budget** (``budget``): per upstream, retries may add at most
  ``budget_ratio`` to the calls made in the last ``budget_window_s``, plus a reserve of
  ``budget_min_retries_per_s`` per second, as Finagle's ``RetryBudget`` does. A retry
  the budget refuses ends the call (``kind="budget_exhausted"``, logged as
  ``upstream.retry_denied``). A hard-down upstream thus sees about ``1 + budget_ratio``
  attempts per call instead of ``attempts``.
* **The shared cooldown** (``shared_cooldown``): a 429 or 503 with ``Retry-After``
  pauses every caller of that upstream until then (an attempt wrapper, order 200).
  A caller whose time budget outlasts the pause waits; the others fail at once with
  503 and ``Retry-After`` (``kind="cooldown"``).

Shared state (the budget, the cooldown) lives in the app's
:class:`~ballast.resilience.UpstreamRegistry`, per upstream.

The final failure is logged as ``upstream.failed`` and raised as
:class:`~ballast.errors.UpstreamError` whose ``kind`` is a
:class:`~ballast.telemetry.Reason`; ``upstream_status`` and ``error_type`` tell what
the last attempt saw. Each retry is logged as ``upstream.retry``. No line carries
headers or the URL, so the API key cannot leak through them. Metrics:
``ballast_upstream_retries_total`` and ``ballast_upstream_retries_denied_total``.

Disabled: each upstream call makes exactly one attempt; no budget, no cooldown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import math
import random
import re
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import Field, field_validator
from yarl import URL

from ballast import budget
from ballast.config import Config, PluginSection
from ballast.errors import UpstreamError
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger
from ballast.resilience import Clock, UpstreamRefused, UpstreamRegistry, UpstreamState
from ballast.telemetry import Reason, Telemetry
from ballast.upstream import (
    Attempt,
    AttemptError,
    AttemptWrapperSpec,
    ClientProvider,
    UpstreamRequest,
    UpstreamResponse,
    log_refused,
    send_attempt,
)

log = get_logger("ballast.retry")

#: Order of the cooldown among attempt wrappers (inside the circuit breaker's 100).
COOLDOWN_ORDER = 200
#: Slot names in an upstream's shared state.
BUDGET_SLOT = "retry.budget"
#: Statuses whose ``Retry-After`` pauses every caller (when ``shared_cooldown`` is on).
COOLDOWN_STATUSES = frozenset({429, 503})

#: ``asyncio.sleep``, looked up per wait (tests slow it down to model a busy loop).
sleep = asyncio.sleep

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

    budget: bool = Field(
        default=True,
        description="a retry budget shared by all calls to one upstream (Finagle/gRPC style)")
    budget_ratio: float = Field(
        default=0.2, ge=0, le=10,
        description="retries may add at most this share to the calls of the last budget window")
    budget_window_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="the sliding window the retry budget counts over, in seconds")
    budget_min_retries_per_s: float = Field(
        default=1.0, ge=0, le=10_000,
        description="a reserve of retries per second that is always allowed")
    shared_cooldown: bool = Field(
        default=True,
        description="a 429/503 with Retry-After pauses every caller of that upstream until then")

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
# the retry budget
# --------------------------------------------------------------------------------------


class RetryBudget:
    """Retries allowed to one upstream: ``ratio`` x recent calls + a reserve (Finagle style).

    Counts over a sliding window of ``window_s`` in ten buckets: every call deposits
    (:meth:`deposit`, once, when its first attempt was sent: calls refused locally earn
    nothing, or an open breaker would bank retries for later) and every retry withdraws
    (:meth:`try_withdraw`). A retry is allowed while
    ``retries < ratio * calls + min_retries_per_s * window_s`` over the window. So a
    hard-down upstream sees at most ``ratio`` extra attempts per call once the reserve
    is spent, and an idle system still retries its rare failures.
    """

    BUCKETS = 10

    def __init__(self, *, ratio: float, window_s: float, min_retries_per_s: float,
                 clock: Clock) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.reserve = min_retries_per_s * window_s
        self._clock = clock
        self._width = window_s / self.BUCKETS
        #: [bucket index, calls, retries], oldest first.
        self._buckets: deque[list[int]] = deque()

    def _current(self) -> list[int]:
        index = math.floor(self._clock() / self._width)
        while self._buckets and self._buckets[0][0] <= index - self.BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]

    def counts(self) -> tuple[int, int]:
        """``(calls, retries)`` within the window now."""
        self._current()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def balance(self) -> float:
        """Retries still allowed now (may be fractional; one needs at least 1)."""
        calls, retries = self.counts()
        return self.ratio * calls + self.reserve - retries

    def deposit(self) -> None:
        self._current()[1] += 1

    def try_withdraw(self) -> bool:
        """Take one retry if the budget allows it; False (and nothing taken) if not."""
        if self.balance() < 1:
            return False
        self._current()[2] += 1
        return True


# --------------------------------------------------------------------------------------
# the shared cooldown (an attempt wrapper)
# --------------------------------------------------------------------------------------


def cooldown_wrapper(upstreams: UpstreamRegistry) -> Callable[[Attempt], Attempt]:
    """Hold each attempt while its upstream's cooldown is in force, or refuse it.

    An attempt that can wait out the pause within its time budget waits (then goes);
    one that cannot is refused at once: :class:`UpstreamRefused` (``cooldown``), 503
    with ``Retry-After``. No attempt reaches the upstream before the pause ends.
    """

    def wrap(attempt: Attempt) -> Attempt:
        async def held(request: UpstreamRequest) -> UpstreamResponse:
            state = upstreams.for_url(request.upstream, request.url)
            wait = state.cooldown_left()
            while wait > 0:  # another 429 may extend the pause while this one waits
                left = budget.remaining()
                if left is not None and wait >= left:
                    raise UpstreamRefused(
                        kind=Reason.COOLDOWN, retry_after_s=wait,
                        internal=f"{request.name}: upstream {request.upstream} cooling down for "
                                 f"{wait:.3f}s, more than the {max(left, 0.0):.3f}s left")
                await sleep(wait)
                wait = state.cooldown_left()
            return await attempt(request)

        return held

    return wrap


# --------------------------------------------------------------------------------------
# one logical call
# --------------------------------------------------------------------------------------


class RetryingCall:
    """The upstream call this plugin supplies: ``await call(request) -> UpstreamResponse``."""

    def __init__(self, attempt: Attempt | ClientProvider, settings: Settings | None = None, *,
                 upstreams: UpstreamRegistry | None = None, telemetry: Telemetry | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        # A bare provider (tests, tools): attempts are plain sends, no attempt wrappers.
        self.attempt: Attempt = attempt if callable(attempt) else send_attempt(attempt, telemetry)
        self.settings = settings or Settings()
        self.upstreams = upstreams if upstreams is not None else UpstreamRegistry()
        self._rng = rng
        telemetry = telemetry or Telemetry()
        self._retries = telemetry.counter("ballast_upstream_retries_total")
        self._denied = telemetry.counter("ballast_upstream_retries_denied_total")

    def _budget(self, state: UpstreamState) -> RetryBudget:
        s = self.settings
        return state.slot(BUDGET_SLOT, lambda st: RetryBudget(
            ratio=s.budget_ratio, window_s=s.budget_window_s,
            min_retries_per_s=s.budget_min_retries_per_s, clock=st.clock))

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        s = self.settings
        if s.attempt_timeout_s is not None:
            request = dataclasses.replace(request, attempt_timeout_s=s.attempt_timeout_s)
        state = self.upstreams.for_url(request.upstream, request.url)
        retry_budget = self._budget(state) if s.budget else None
        sent = 0
        status: int | None = None
        error: BaseException | None = None
        number = 0
        while True:
            number += 1
            try:
                response = await self.attempt(dataclasses.replace(request, attempt=number))
            except UpstreamRefused as refused:
                if sent == 0:  # nothing reached the upstream: the refusal is the answer
                    log_refused(request, refused)
                    raise
                self._denied.inc(request.upstream, refused.kind)
                raise self._failed(request, sent, refused.kind, status, error,
                                   f"attempt {number} refused ({refused.kind})") from refused
            except UpstreamError as exc:
                if exc.attempts == 0:  # not sent (no time left for it)
                    raise self._failed(request, sent, exc.kind, status, error,
                                       "no time left for another attempt") from exc
                sent += 1
                if sent == 1 and retry_budget is not None:
                    retry_budget.deposit()  # only calls that reached the upstream earn retries
                status, error = exc.upstream_status, exc.__cause__ or exc
                if not (isinstance(exc, AttemptError) and exc.retryable):
                    raise self._failed(request, sent, exc.kind, status, error,
                                       exc.internal) from exc
                kind: str = exc.kind
                retry_after: float | None = None
            else:
                sent += 1
                if sent == 1 and retry_budget is not None:
                    retry_budget.deposit()
                if response.status not in s.statuses:
                    return UpstreamResponse(response.status, response.headers, response.body,
                                            attempts=sent)
                status, error, kind = response.status, None, Reason.STATUS
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and s.shared_cooldown and status in COOLDOWN_STATUSES:
                    state.cool_down(min(retry_after, s.max_retry_after_s))
            if number >= s.attempts:
                raise self._failed(request, sent, kind, status, error, f"answered {status}"
                                   if error is None else type(error).__name__)
            delay = (min(retry_after, s.max_retry_after_s) if retry_after is not None else
                     backoff_delay(number, start_s=s.start_timeout_s, factor=s.factor,
                                   cap_s=s.max_timeout_s, jitter=s.jitter, rng=self._rng))
            left = budget.remaining()
            if left is not None and delay >= left:
                self._denied.inc(request.upstream, Reason.BUDGET)
                raise self._failed(request, sent, Reason.BUDGET, status, error,
                                   f"next wait of {delay:.3f}s outlasts the {max(left, 0):.3f}s left")
            if retry_budget is not None and not retry_budget.try_withdraw():
                calls, retries = retry_budget.counts()
                log.warning("upstream.retry_denied", name=request.name, upstream=request.upstream,
                            attempt=number, kind=Reason.BUDGET_EXHAUSTED, status=status,
                            error_type=_type_name(error), window_calls=calls, window_retries=retries)
                self._denied.inc(request.upstream, Reason.BUDGET_EXHAUSTED)
                raise self._failed(request, sent, Reason.BUDGET_EXHAUSTED, status, error,
                                   "the retry budget is spent")
            log.warning("upstream.retry", name=request.name, upstream=request.upstream, attempt=number,
                        status=status, error_type=_type_name(error), delay_ms=_ms(delay),
                        remaining_ms=None if left is None else _ms(max(left, 0.0)))
            self._retries.inc(request.upstream, kind)
            await sleep(delay)

    def _failed(self, request: UpstreamRequest, sent: int, kind: str, status: int | None,
                error: BaseException | None, why: str) -> UpstreamError:
        """Log ``upstream.failed`` and build the error to raise (502 on resolve)."""
        log.error("upstream.failed", name=request.name, upstream=request.upstream, attempts=sent,
                  kind=kind, status=status, error_type=_type_name(error))
        return UpstreamError(
            kind=kind, upstream_status=status, attempts=sent,
            internal=f"{request.name} ({_path(request.url)}): gave up after {sent} attempt(s): {why}")


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
def ballast_upstream_call(config: Config, provider: ClientProvider, telemetry: Telemetry,
                          attempt: Attempt, upstreams: UpstreamRegistry) -> RetryingCall:
    return RetryingCall(attempt, config.plugin("retry"), upstreams=upstreams, telemetry=telemetry)


@hookimpl
def ballast_upstream_attempt_wrappers(config: Config,
                                      upstreams: UpstreamRegistry) -> list[AttemptWrapperSpec]:
    if not config.plugin("retry").shared_cooldown:
        return []
    return [AttemptWrapperSpec("retry.cooldown", COOLDOWN_ORDER, cooldown_wrapper(upstreams))]
