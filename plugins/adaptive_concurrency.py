"""adaptive_concurrency: a limit on requests in flight, learnt from their latency.

The bulkhead bounds threads, but nothing else bounds the requests in flight on the
event loop: past capacity every request waits longer, clients time out and retry, and
the overload feeds itself. This plugin admits a request only while fewer than
``limit`` are in flight, and answers the rest at once, before their body is read, with
a 503 problem and ``Retry-After``. The decision takes microseconds, and the whole
refusal, HTTP parsing and its access line included, about 0.1 ms of server CPU (a
100-mutation batch admitted costs over 1 ms); serving late costs everyone.

The limit is adapted by :class:`GradientLimit` (a pure class, driven by the times and
latencies it is given) in the manner of Envoy's adaptive concurrency filter and
Netflix's Gradient2:

* every window (``window_ms``) the median latency of the requests that finished in it
  is the *short-term* latency; the *baseline* is the latency without queueing, the
  lowest window median seen, re-measured periodically;
* ``gradient = tolerance * max(baseline, latency_floor) / short``: below 1 the requests
  are queueing, so the limit shrinks; above 1 there is room, and the limit grows, but
  only if the load actually used at least half of it (an idle server does not learn
  that it could take a thousand requests). The floor is there for group commit: a 1 ms
  baseline tripling to 3 ms as 64 writers share each fsync is batching, which buys
  throughput, not queueing worth refusing anyone for;
* shrinking, the limit moves a ``smoothing`` part of the way to ``limit * gradient``
  (noise in one window moves it little); with latency over twice what is tolerated
  (gradient 0.5 or less: a flood arriving while the limit is where a lighter load left
  it) it halves at once, so the queue the flood got in lasts a few windows;
* growing, it moves by the headroom the latency shows, ``limit * (gradient - 1)`` (past
  saturation latency grows in proportion to the requests in flight, so that is about
  where the latency would reach the tolerance), but by at most ``sqrt(limit)`` a window
  (Gradient2's queue allowance), so one quiet window cannot double it into a queue it
  must then shed its way out of, and a limit at the line still probes upward. Between
  the two the limit settles where the latency is about ``tolerance`` times the
  reference, and holds still under a steady flood;
* a request refused downstream for capacity (the bulkhead's 503) or cancelled by its
  time budget (504) is a *drop*: the window's limit is cut by a fifth, whatever the
  latency says, so the next excess is refused at the door, cheaply, instead of after
  its body was read and parsed, or after it used most of its budget;
* baseline refresh: while the load is light (at most ``min_limit`` in flight) every
  window is a measurement of the unloaded latency, and the baseline follows it. Under
  sustained load the baseline could only be re-learnt by lowering the concurrency, so
  every ``probe_interval_s`` (the first time after ten windows, in case the server
  started into a flood) the limit is pinned to ``min_limit`` until enough requests have
  finished at that concurrency (Envoy's minRTT recalculation); the limit
  then goes back to where it was. While latency is under ``tolerance`` times the
  floor the baseline decides nothing, and no probe is made.

Clients that do not wait: a refusal records when its connection (by peer address) may
come back. A request over the limit on a connection back before then (a client that
resends at once, as wrk does) is not refused again at once: it waits, a sleeping task
holding no slot, until then (at most a second), and is admitted if there is room, else
refused. Refused
at once, such clients loop, and their refusals' cost reads as queueing to the limit,
which shrinks, refusing more, down to ``min_limit``. A client that honours
``Retry-After`` never waits; the first refusal is always immediate. Behind a proxy that
pools its connections to the server (nginx ``upstream { keepalive }``), one connection
carries many clients' requests, so a request may wait for another client's refusal:
``hold_early = false`` refuses every request over the limit at once.

Priorities: requests are classified once per route. ``/healthz``, ``/readyz`` and
``/metrics`` are never shed, counted or measured. Others are admitted while the
requests in flight are under their class's share of the limit: mutation ingest 100 %,
reads and session creation 90 %, resolve and finalize (work that can wait or be
retried later) 75 %. So, as load rises, background work is shed first and ingest last.
A long-poll (a request with a ``wait`` query parameter) waits on an event rather than
on the server's capacity: it is admitted at the lowest share but neither occupies a
slot nor is measured.

Disabled: every request is admitted; past capacity, latency grows for everyone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from statistics import median

from aiohttp import web
from pydantic import Field, model_validator

from ballast.config import Config, PluginSection
from ballast.errors import BudgetExceeded, Overloaded
from ballast.hookspecs import hookimpl
from ballast.keys import REQUEST_ID
from ballast.logging import get_logger
from ballast.middleware import Handler, Middleware, MiddlewareSpec
from ballast.problems import problem_response
from ballast.telemetry import Telemetry

ORDER = 150  # inside the sanitizer, outside the timeout budget: a refusal starts no timer
log = get_logger("ballast.admission")

#: Paths never shed, counted or measured: the operator's view of a struggling server.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: Share of the limit each priority class may fill; the highest share is shed last.
SHARES: dict[str, float] = {"ingest": 1.0, "standard": 0.9, "deferrable": 0.75}
#: The longest a request back before its Retry-After is held (with a long
#: ``retry_after_s``, a client would time out first; a second still caps the loop of a
#: client that resends at once to one refusal a second).
HOLD_MAX_S = 1.0
_DEFERRABLE_SUFFIXES = ("/resolve", "/finalize")


class Settings(PluginSection):
    min_limit: int = Field(8, ge=1, le=100_000, description="the limit never goes below this")
    max_limit: int = Field(1000, ge=1, le=100_000, description="the limit never goes above this")
    initial_limit: int = Field(64, ge=1, le=100_000, description="the limit at start-up")
    tolerance: float = Field(1.5, ge=1.0, le=10.0,
                             description="latency over the baseline tolerated before the limit shrinks")
    latency_floor_ms: float = Field(
        15.0, ge=0.0, le=60_000.0,
        description="latency never treated as queueing: below tolerance x this, the limit never shrinks")
    window_ms: int = Field(100, ge=10, le=60_000, description="how often the limit is recomputed")
    probe_interval_s: float = Field(
        30.0, ge=1.0, le=3600.0,
        description="under sustained load, how often the unloaded latency is re-measured")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent with a refusal")
    hold_early: bool = Field(
        True, description="a request over the limit on a connection refused less than Retry-After ago "
                          "waits until then instead of being refused again at once")

    @model_validator(mode="after")
    def _ordered(self) -> Settings:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need min_limit <= initial_limit <= max_limit")
        return self


class GradientLimit:
    """The adaptive limit. Pure: it reads no clock; callers pass ``now`` (seconds).

    ``try_acquire(share)`` before a request, ``release(now, latency)`` after it. The
    limit is recomputed when a release crosses the end of a window.
    """

    __slots__ = (
        "_drops",
        "_long_samples",
        "_next_probe",
        "_peak",
        "_probe",
        "_samples",
        "_saved_limit",
        "_seen",
        "_window_end",
        "baseline",
        "floor_s",
        "in_flight",
        "limit",
        "max_limit",
        "min_limit",
        "min_samples",
        "probe_interval_s",
        "probe_samples",
        "short",
        "smoothing",
        "tolerance",
        "value",
        "window_s",
    )

    def __init__(self, *, min_limit: int = 8, max_limit: int = 1000, initial_limit: int = 64,
                 tolerance: float = 1.5, window_s: float = 0.1, smoothing: float = 0.3, floor_s: float = 0.0,
                 min_samples: int = 8, probe_interval_s: float = 30.0, probe_samples: int = 32) -> None:
        if not 1 <= min_limit <= initial_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= initial_limit <= max_limit")
        if tolerance < 1 or window_s <= 0 or not 0 < smoothing <= 1:
            raise ValueError("need tolerance >= 1, window_s > 0, 0 < smoothing <= 1")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.tolerance = tolerance
        self.floor_s = floor_s
        self.window_s = window_s
        self.smoothing = smoothing
        self.min_samples = min_samples
        self.probe_interval_s = probe_interval_s
        self.probe_samples = probe_samples
        self.value = float(initial_limit)  # the limit before rounding
        self.limit = initial_limit
        self.in_flight = 0
        self.baseline: float | None = None  # unloaded latency estimate, seconds
        self.short: float | None = None     # the last window's median latency
        self._samples: list[float] = []
        self._long_samples: list[float] = []  # a probe's samples, across windows
        self._peak = 0
        self._drops = 0
        self._seen = 0
        self._window_end: float | None = None
        self._next_probe: float | None = None
        self._probe = ""  # "" | "draining" | "measuring"
        self._saved_limit = float(initial_limit)

    # -- per request ------------------------------------------------------------------

    def try_acquire(self, share: float = 1.0) -> bool:
        """Take a slot if fewer than ``share`` of the limit are in flight."""
        if self.in_flight >= self.limit * share:
            return False
        self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight
        return True

    def over(self, share: float) -> bool:
        """Would a request of this share be refused now? (For requests holding no slot.)"""
        return self.in_flight >= self.limit * share

    def release(self, now: float, latency: float | None, *, dropped: bool = False) -> bool:
        """Give the slot back; ``latency`` None for a request not to be measured.

        Returns True when this release ended a window (the limit may have changed).
        """
        self.in_flight -= 1
        return self.record(now, latency, dropped=dropped)

    def record(self, now: float, latency: float | None, *, dropped: bool = False) -> bool:
        if dropped:
            self._drops += 1
        elif latency is not None:
            samples = self._samples
            self._seen += 1
            if len(samples) < 1024:
                samples.append(latency)
            else:  # a bounded window; overwrite in turn so late samples still count
                samples[self._seen % 1024] = latency
        end = self._window_end
        if end is None:
            self._window_end = now + self.window_s
            # A server started into a flood sees only queued latencies, and would take
            # them for its baseline: the first probe comes early (and is skipped if
            # the load is light or under the floor).
            self._next_probe = now + min(self.probe_interval_s, 10 * self.window_s)
            return False
        if now < end:
            return False
        return self._close_window(now)

    # -- per window -------------------------------------------------------------------

    def _close_window(self, now: float) -> bool:
        if len(self._samples) < self.min_samples and not self._drops:
            return False  # too few to judge: let the window run on
        samples, drops, peak = self._samples, self._drops, self._peak
        self._samples, self._drops, self._peak, self._seen = [], 0, self.in_flight, 0
        self._window_end = now + self.window_s
        short = median(samples) if samples else None
        self.short = short
        if self._probe:
            self._step_probe(now, samples)
            return True
        # Light load (at most min_limit in flight, and under half the limit, so nothing
        # queued at the door) measures the unloaded latency directly: no probe needed.
        light = peak <= self.min_limit and peak * 2 <= self.value
        if short is not None and (self.baseline is None or short < self.baseline or light):
            self.baseline = short
            if light:
                self._next_probe = now + self.probe_interval_s
        if drops:
            target = self.value * 0.8
        elif short is None or self.baseline is None:
            return True
        else:
            reference = max(self.baseline, self.floor_s)
            gradient = self.tolerance * reference / short
            if gradient <= 0.5:
                # Latency over twice what is tolerated: not noise but a queue (a flood's
                # first windows, with the limit still where a lighter load left it).
                # Halve at once; each window waited is one more window of the queue.
                target = self.value * 0.5
            elif gradient < 1.0:  # queueing: shrink in proportion, smoothed
                target = self.value + self.smoothing * (self.value * gradient - self.value)
            elif peak * 2 < self.value:
                target = self.value  # app-limited: the load never tested this limit
            else:
                # Room: grow by the headroom the latency shows (past saturation latency
                # grows in proportion to the requests in flight, so value * gradient is
                # about where it would reach the tolerance), but by at most sqrt(limit)
                # a window, so that a noisy window cannot double the limit and a limit
                # at the line still probes upward.
                step = self.value * (gradient - 1.0)
                target = self.value + max(1.0, min(step, math.sqrt(self.value)))
        self._set(target)
        if self._next_probe is not None and now >= self._next_probe:
            if short is None or short <= self.tolerance * self.floor_s:
                # Under the floor the baseline decides nothing: no need to refuse
                # anyone to re-measure it.
                self._next_probe = now + self.probe_interval_s
                return True
            self._probe = "draining"
            self._saved_limit = self.value
            self.limit = self.min_limit
        return True

    def _step_probe(self, now: float, samples: list[float]) -> None:
        if self._probe == "draining":
            # Requests admitted before the probe still run at the old concurrency.
            if self.in_flight <= self.min_limit:
                self._probe = "measuring"
                self._long_samples = []
            return
        self._long_samples.extend(samples)
        if len(self._long_samples) < self.probe_samples:
            return
        self.baseline = median(self._long_samples)
        self._long_samples = []
        self._probe = ""
        self._next_probe = now + self.probe_interval_s
        self._set(self._saved_limit)

    def _set(self, value: float) -> None:
        self.value = min(float(self.max_limit), max(float(self.min_limit), value))
        self.limit = int(self.value)

    @property
    def probing(self) -> bool:
        return bool(self._probe)


def _share_of(method: str, route: str) -> float:
    if method == "POST" and route.endswith("/mutations"):
        return SHARES["ingest"]
    if route.endswith(_DEFERRABLE_SUFFIXES) and method == "POST":
        return SHARES["deferrable"]
    return SHARES["standard"]


class Admission:
    """The middleware and its bookkeeping: shed counts, sampled log lines, metrics."""

    def __init__(self, limiter: GradientLimit, *, retry_after_s: int = 1,
                 telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 hold_early: bool = True) -> None:
        self.limiter = limiter
        self.hold_early = hold_early
        self.retry_after = str(retry_after_s)
        self.retry_after_s = float(retry_after_s)
        self.clock = clock
        self.sleep = sleep
        self.held_total = 0  # refusals held back until the Retry-After given before ran out
        # When each connection (by peer address) that was refused may come back, in two
        # generations of retry_after_s each, so that the maps stay small.
        self._due: dict[object, float] = {}
        self._due_before: dict[object, float] = {}
        self._generation_end = -math.inf
        self.shed_total = 0
        self._unlogged = 0
        self._last_shed_line = -math.inf
        self._last_limit_line = -math.inf
        self._last_shed_route = ""
        self._logged_limit = limiter.limit
        self._routes: dict[object, tuple[float, str]] = {}
        telemetry = telemetry or Telemetry()
        self._shed_metric = telemetry.counter("ballast_load_shed_total")
        telemetry.gauge("ballast_concurrency_limit").sample(lambda: float(limiter.limit))
        telemetry.gauge("ballast_http_requests_in_flight").sample(lambda: float(limiter.in_flight))

    def _classify(self, request: web.Request) -> tuple[float, str]:
        """(share of the limit, route template); share 0 for a route never shed."""
        resource = request.match_info.route.resource
        if resource is None:
            return SHARES["standard"], "(unmatched)"
        route = resource.canonical
        if route in EXEMPT_PATHS:
            return 0.0, route
        return _share_of(request.method, route), route

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Classified once per route object (a matched route is one object for the app's
        # life; an unmatched request gets a fresh one, so it is classified each time).
        key = request.match_info.route
        entry = self._routes.get(key)
        if entry is None:
            entry = self._classify(request)
            if key.resource is not None:
                self._routes[key] = entry
        share, route = entry
        if not share:
            return await handler(request)
        limiter = self.limiter
        if request.query_string and "wait" in request.query:
            # A long-poll parks on an event: it costs no capacity while it waits.
            if limiter.over(SHARES["deferrable"]):
                return self._shed(request, route)
            return await handler(request)
        if not limiter.try_acquire(share):
            wait = self._early(request) if self.hold_early else 0.0
            if wait <= 0.0:
                return self._shed(request, route)
            # Back on the same connection before the Retry-After it was given ran out
            # (a client that retries at once, as wrk does): its request waits, at no
            # cost but a sleeping task, until then, and is admitted if there is room by
            # then, else refused. Refused at once, such a client would loop: each
            # refusal costs about 0.1 ms (parsing, the access line), as much as a small
            # request, and the limit would read that work as queueing and shrink,
            # refusing more (measured: 14,065 refusals in 4 s, the limit at min_limit,
            # half the goodput of admitting everyone).
            self.held_total += 1
            await self.sleep(min(wait, HOLD_MAX_S))
            if not limiter.try_acquire(share):
                return self._shed(request, route)
        clock = self.clock
        started = clock()
        dropped = False
        measured = True
        try:
            response = await handler(request)
            status = response.status
            dropped = status == 503 or status == 504
            return response
        except (Overloaded, BudgetExceeded):
            dropped = True
            raise
        except BaseException:
            measured = False  # a failure or a client that left says nothing about load
            raise
        finally:
            now = clock()
            if limiter.release(now, now - started if measured else None, dropped=dropped):
                self._window_closed(now)
            elif self._unlogged and now - self._last_shed_line >= 1.0:
                self._log_shed(now)

    def _early(self, request: web.Request) -> float:
        """Seconds until this request's connection may come back (0: not refused lately)."""
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return 0.0
        due = self._due.get(peer)
        if due is None:
            due = self._due_before.get(peer)
        return 0.0 if due is None else due - self.clock()

    def _shed(self, request: web.Request, route: str) -> web.Response:
        self.shed_total += 1
        self._unlogged += 1
        self._last_shed_route = route
        self._shed_metric.inc(route)
        now = self.clock()
        if now >= self._generation_end:
            self._due_before, self._due = self._due, {}
            self._generation_end = now + self.retry_after_s
        if self.hold_early:
            transport = request.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            if peer:
                self._due[peer] = now + self.retry_after_s
        if now - self._last_shed_line >= 1.0:
            self._log_shed(now)
        return problem_response(
            503, "Service overloaded", "The server is at capacity; retry after the time in Retry-After.",
            request.get(REQUEST_ID, ""), headers={"Retry-After": self.retry_after})

    def _log_shed(self, now: float) -> None:
        """One line for every shed since the last one: ``count`` of them, the latest's route."""
        lim = self.limiter
        log.warning("load.shed", count=self._unlogged, total=self.shed_total, route=self._last_shed_route,
                    limit=lim.limit, in_flight=lim.in_flight, kind="overloaded")
        self._unlogged = 0
        self._last_shed_line = now

    def _window_closed(self, now: float) -> None:
        lim = self.limiter
        moved = abs(lim.limit - self._logged_limit) >= max(2, self._logged_limit // 5)
        if moved and now - self._last_limit_line >= 1.0:
            log.info("load.limit", limit=lim.limit, previous=self._logged_limit, in_flight=lim.in_flight,
                     baseline_ms=_ms(lim.baseline), latency_ms=_ms(lim.short), probing=lim.probing)
            self._logged_limit = lim.limit
            self._last_limit_line = now
        if self._unlogged and now - self._last_shed_line >= 1.0:
            self._log_shed(now)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def admission(settings: Settings, telemetry: Telemetry | None = None,
              clock: Callable[[], float] = time.monotonic) -> Admission:
    limiter = GradientLimit(min_limit=settings.min_limit, max_limit=settings.max_limit,
                            initial_limit=settings.initial_limit, tolerance=settings.tolerance,
                            floor_s=settings.latency_floor_ms / 1000,
                            window_s=settings.window_ms / 1000, probe_interval_s=settings.probe_interval_s)
    return Admission(limiter, retry_after_s=settings.retry_after_s, telemetry=telemetry, clock=clock,
                     hold_early=settings.hold_early)


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_middlewares(config: Config, telemetry: Telemetry) -> list[MiddlewareSpec]:
    s: Settings = config.plugin("adaptive_concurrency")
    mw: Middleware = admission(s, telemetry)
    return [MiddlewareSpec("adaptive_concurrency", ORDER, mw)]
