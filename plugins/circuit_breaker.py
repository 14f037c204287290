"""circuit_breaker: stop sending to an upstream that is failing, and find out when it heals.

Retries help with blips; against an upstream that is down they only add load, and every
caller still waits for its attempts to fail. A breaker per upstream (provider + host,
kept in the app's :class:`~ballast.resilience.UpstreamRegistry`) watches the outcome of
every attempt over a sliding time window and, once too many fail, refuses attempts at
once for a while: callers get an honest 503 with ``Retry-After`` in milliseconds, and
the upstream gets room to recover.

The state machine (resilience4j's and Polly's, without the operator states):

* **closed**: attempts go through and are counted in a window of ``window_s`` seconds
  (ten buckets). Once the window holds at least ``minimum_calls`` attempts and the
  share that failed reaches ``failure_ratio``, the breaker opens. Failures are
  retryable statuses (429 and every 5xx), timeouts and connection errors; any other
  outcome (a 2xx, a 4xx, a redirect, an oversized body) is a success for this purpose:
  the upstream answered.
* **open**: every attempt is refused before it is sent
  (:class:`~ballast.resilience.UpstreamRefused`, ``kind="circuit_open"``, never
  retried). The client gets 503 problem+json with ``Retry-After``: whole seconds until
  the half-open probe, at least 1. After ``break_s`` seconds the breaker turns
  half-open. Each re-open without a success in between doubles the break, up to
  ``max_break_s``.
* **half-open**: up to ``half_open_probes`` attempts go through as probes, the rest are
  refused (``Retry-After: 1``). A failed probe opens the breaker again (with the longer
  break); once that many probes succeed it closes, with an empty window and the break
  back to ``break_s``.

An attempt that an inner wrapper refuses (the cooldown) or that is cancelled is not
counted. Transitions are logged (``circuit.opened``, ``circuit.half_open``,
``circuit.closed``) and counted (``ballast_circuit_transitions_total``); the state is
the sampled gauge ``ballast_circuit_state`` (0 closed, 1 half-open, 2 open). Time comes
from the registry's clock, so tests drive the machine with a fake clock.

Disabled: no attempt is ever refused; a hard-down upstream gets every call's attempts
(bounded only by the retry plugin's budget).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from pydantic import Field, model_validator

from ballast.config import Config, PluginSection
from ballast.errors import UpstreamError
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger
from ballast.resilience import Clock, UpstreamRefused, UpstreamRegistry, UpstreamState
from ballast.telemetry import Reason, Telemetry
from ballast.upstream import Attempt, AttemptWrapperSpec, UpstreamRequest, UpstreamResponse

log = get_logger("ballast.circuit_breaker")

#: Order among attempt wrappers: outside the retry plugin's cooldown (200).
ORDER = 100
SLOT = "circuit_breaker"


class Settings(PluginSection):
    failure_ratio: float = Field(
        default=0.5, gt=0, le=1,
        description="open once this share of the window's attempts failed")
    minimum_calls: int = Field(
        default=10, ge=1, le=1_000_000,
        description="attempts the window must hold before the ratio can open the breaker")
    window_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="the sliding window of attempt outcomes, in seconds")
    break_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="how long the breaker stays open before a half-open probe, in seconds")
    max_break_s: float = Field(
        default=60.0, gt=0, le=86_400,
        description="cap on the break, which doubles on each re-open without a success")
    half_open_probes: int = Field(
        default=1, ge=1, le=1000,
        description="attempts let through while half-open; all must succeed to close")

    @model_validator(mode="after")
    def _break_within_cap(self) -> Settings:
        if self.max_break_s < self.break_s:
            raise ValueError(f"max_break_s ({self.max_break_s}) must be at least break_s ({self.break_s})")
        return self


class State(IntEnum):
    """The gauge's values."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to send one attempt; ``probe`` when it was granted half-open."""

    probe: bool
    generation: int


#: Called on every transition: (breaker, new state).
OnTransition = Callable[["CircuitBreaker", State], None]


class CircuitBreaker:
    """One upstream's breaker: :meth:`acquire` before an attempt, :meth:`record` after it."""

    BUCKETS = 10

    def __init__(self, label: str, settings: Settings, clock: Clock,
                 on_transition: OnTransition | None = None) -> None:
        self.label = label
        self.settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self._state = State.CLOSED
        self._width = settings.window_s / self.BUCKETS
        #: [bucket index, attempts, failures], oldest first.
        self._buckets: deque[list[int]] = deque()
        self.open_until = 0.0
        #: Opens in a row without a success: the next break is ``break_s * 2 ** opens``.
        self.opens = 0
        self.current_break_s = 0.0
        self._probes_out = 0
        self._probe_successes = 0
        #: Bumped on every transition: an outcome from an older generation is ignored.
        self._generation = 0

    # -- reading --------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The state now (an open breaker whose break has passed turns half-open)."""
        if self._state is State.OPEN and self._clock() >= self.open_until:
            self._move(State.HALF_OPEN)
        return self._state

    def counts(self) -> tuple[int, int]:
        """``(attempts, failures)`` in the window now."""
        self._bucket()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def retry_after_s(self) -> float:
        """Seconds until an attempt may be let through (0 when one would be now)."""
        state = self.state
        if state is State.OPEN:
            return max(self.open_until - self._clock(), 0.0)
        if state is State.HALF_OPEN and self._probes_out >= self.settings.half_open_probes:
            return 1.0
        return 0.0

    # -- the three calls ------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit to send, or ``None``: refuse the attempt (see :meth:`retry_after_s`)."""
        state = self.state
        if state is State.CLOSED:
            return Permit(False, self._generation)
        if state is State.HALF_OPEN and self._probes_out < self.settings.half_open_probes:
            self._probes_out += 1
            return Permit(True, self._generation)
        return None

    def release(self, permit: Permit) -> None:
        """The attempt was not sent after all (refused further in, or cancelled)."""
        if permit.probe and permit.generation == self._generation:
            self._probes_out = max(self._probes_out - 1, 0)

    def record(self, permit: Permit, *, failed: bool) -> None:
        """The outcome of an attempt sent under ``permit``."""
        if permit.generation != self._generation:
            return  # it started in an earlier state; what it says is already decided
        if permit.probe:
            self._probes_out = max(self._probes_out - 1, 0)
            if failed:
                self._open()
            else:
                self._probe_successes += 1
                if self._probe_successes >= self.settings.half_open_probes:
                    self._move(State.CLOSED)
            return
        bucket = self._bucket()
        bucket[1] += 1
        bucket[2] += int(failed)
        if failed and self._state is State.CLOSED:
            attempts, failures = self.counts()
            if attempts >= self.settings.minimum_calls and \
                    failures >= self.settings.failure_ratio * attempts:
                self._open()

    # -- transitions ----------------------------------------------------------------

    def _bucket(self) -> list[int]:
        index = math.floor(self._clock() / self._width)
        while self._buckets and self._buckets[0][0] <= index - self.BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]

    def _open(self) -> None:
        s = self.settings
        self.current_break_s = min(s.break_s * 2 ** min(self.opens, 32), s.max_break_s)
        self.opens += 1
        self.open_until = self._clock() + self.current_break_s
        self._move(State.OPEN)

    def _move(self, state: State) -> None:
        self._state = state
        self._generation += 1
        self._probes_out = 0
        self._probe_successes = 0
        if state is State.CLOSED:
            self.opens = 0
            self._buckets.clear()
        if self._on_transition is not None:
            self._on_transition(self, state)


def is_failure(response: UpstreamResponse | None, error: UpstreamError | None) -> bool:
    """Whether an attempt's outcome counts against the upstream's health."""
    if error is not None:
        return error.kind in (Reason.TIMEOUT, Reason.CONNECTION) or (
            error.upstream_status is not None and _failing_status(error.upstream_status))
    return response is not None and _failing_status(response.status)


def _failing_status(status: int) -> bool:
    return status == 429 or status >= 500


class BreakerWrapper:
    """The attempt wrapper: one breaker per upstream, from the shared registry."""

    def __init__(self, settings: Settings, upstreams: UpstreamRegistry, telemetry: Telemetry) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self._telemetry = telemetry
        self._gauge = telemetry.gauge("ballast_circuit_state")
        self._transitions = telemetry.counter("ballast_circuit_transitions_total")

    def breaker(self, state: UpstreamState) -> CircuitBreaker:
        return state.slot(SLOT, self._make)

    def _make(self, state: UpstreamState) -> CircuitBreaker:
        breaker = CircuitBreaker(state.label, self.settings, state.clock, self._transition)
        self._gauge.sample(lambda: float(breaker.state), state.label)
        return breaker

    def _transition(self, breaker: CircuitBreaker, state: State) -> None:
        self._transitions.inc(breaker.label, state.name.lower())
        if state is State.OPEN:
            attempts, failures = breaker.counts()
            log.warning("circuit.opened", upstream=breaker.label, kind=Reason.CIRCUIT_OPEN,
                        ratio=round(failures / attempts, 3) if attempts else None,
                        window_attempts=attempts, window_failures=failures,
                        window_s=self.settings.window_s, break_s=breaker.current_break_s,
                        reopen=breaker.opens > 1)
        elif state is State.HALF_OPEN:
            log.info("circuit.half_open", upstream=breaker.label, probes=self.settings.half_open_probes)
        else:
            log.info("circuit.closed", upstream=breaker.label)

    def __call__(self, attempt: Attempt) -> Attempt:
        async def guarded(request: UpstreamRequest) -> UpstreamResponse:
            breaker = self.breaker(self.upstreams.for_url(request.upstream, request.url))
            permit = breaker.acquire()
            if permit is None:
                raise UpstreamRefused(
                    kind=Reason.CIRCUIT_OPEN, retry_after_s=breaker.retry_after_s(),
                    internal=f"{request.name}: circuit of upstream {request.upstream} is "
                             f"{breaker.state.name.lower()}; attempt refused")
            try:
                response = await attempt(request)
            except UpstreamError as exc:
                if isinstance(exc, UpstreamRefused) or exc.attempts == 0:
                    breaker.release(permit)  # never sent: says nothing about the upstream
                else:
                    breaker.record(permit, failed=is_failure(None, exc))
                raise
            except BaseException:
                breaker.release(permit)
                raise
            breaker.record(permit, failed=is_failure(response, None))
            return response

        return guarded


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_upstream_attempt_wrappers(config: Config, telemetry: Telemetry,
                                      upstreams: UpstreamRegistry) -> list[AttemptWrapperSpec]:
    wrapper = BreakerWrapper(config.plugin("circuit_breaker"), upstreams, telemetry)
    return [AttemptWrapperSpec("circuit_breaker", ORDER, wrapper)]
