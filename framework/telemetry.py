"""Where every part of Ballast records what it did: one catalogue, one recording API.

A plugin or core module takes an instrument once, when the app is built::

    attempts = telemetry.counter("ballast_upstream_attempts_total")
    ...
    attempts.inc("inference", "ok")          # label values in the catalogue's order

and calls it on the hot path. Recording goes to whatever exporter is attached (the
``metrics`` plugin attaches a Prometheus one); with none attached, a call is one
attribute read and a comparison, so recording costs nothing worth measuring.

Spans work the same way: code that does a unit of work worth following (a finalize
stage) wraps it in ``with telemetry.span(f"finalize {name}", stage=name):``; the
``tracing`` plugin attaches a :class:`Tracer` that makes it an OpenTelemetry span, and
with none attached the ``with`` costs one attribute read.

The catalogue (:data:`METRICS`) is the single list of metric names, types, labels and
help texts: the exporter declares from it, docs and dashboards are checked against it.
Labels are low-cardinality by contract: route templates, upstream names, outcomes and
reason codes, never raw paths, session ids or keys.

Decision reasons: every refusal or give-up carries one ``kind`` code from
:class:`Reason`, the same string on the log line, the metric label and (where safe) the
client's problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

MetricType = Literal["counter", "gauge", "histogram"]

#: Seconds: request, stage and upstream latencies from 1 ms to a minute.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Mutations per group commit.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Reason(StrEnum):
    """Why something was refused, degraded or given up: one code everywhere."""

    STATUS = "status"                      # the upstream answered a failing status
    TIMEOUT = "timeout"                    # an attempt ran past its timeout
    CONNECTION = "connection"              # connect/reset/protocol error
    BUDGET = "budget"                      # no time budget left for an attempt
    BUDGET_EXHAUSTED = "budget_exhausted"  # the retry budget refused a retry
    COOLDOWN = "cooldown"                  # a shared Retry-After pause is in force
    CIRCUIT_OPEN = "circuit_open"          # the breaker refused the attempt
    TOO_LARGE = "too_large"                # an upstream body over the response cap
    REDIRECT = "redirect"                  # an upstream 3xx (never followed)
    MALFORMED = "malformed"                # an upstream reply that fails validation
    OVERLOADED = "overloaded"              # executor or admission capacity exhausted


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _m(name: str, type_: MetricType, help_: str, labels: Sequence[str] = (),
       buckets: Sequence[float] = ()) -> tuple[str, MetricSpec]:
    return name, MetricSpec(name, type_, help_, tuple(labels), tuple(buckets))


#: Every metric Ballast records. Add new ones here, nowhere else.
METRICS: dict[str, MetricSpec] = dict([
    _m("ballast_http_requests_total", "counter", "HTTP requests answered, by route template and status.",
       ("method", "route", "status")),
    _m("ballast_http_request_duration_seconds", "histogram", "Time to answer an HTTP request.",
       ("route",), LATENCY_BUCKETS),
    _m("ballast_http_requests_in_flight", "gauge", "HTTP requests being served now."),
    _m("ballast_upstream_calls_total", "counter",
       "Logical upstream calls (all attempts of one call), by final outcome (ok or a reason).",
       ("upstream", "outcome")),
    _m("ballast_upstream_attempts_total", "counter",
       "Upstream attempts actually sent, by outcome (ok or a reason).", ("upstream", "outcome")),
    _m("ballast_upstream_retries_total", "counter", "Retries started, by the reason of the retried attempt.",
       ("upstream", "reason")),
    _m("ballast_upstream_retries_denied_total", "counter",
       "Retries refused (retry budget exhausted, cooldown, circuit open, no time left).",
       ("upstream", "reason")),
    _m("ballast_circuit_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
       ("upstream",)),
    _m("ballast_circuit_transitions_total", "counter", "Circuit breaker state changes, by new state.",
       ("upstream", "state")),
    _m("ballast_fallback_total", "counter", "Answers served degraded by the fallback provider.",
       ("operation", "reason")),
    _m("ballast_load_shed_total", "counter", "Requests refused by admission control.", ("route",)),
    _m("ballast_concurrency_limit", "gauge", "The adaptive concurrency limit now."),
    _m("ballast_executor_in_use", "gauge", "Executor threads busy with blocking work."),
    _m("ballast_executor_queued", "gauge", "Blocking work waiting for an executor thread."),
    _m("ballast_executor_rejected_total", "counter", "Blocking work refused by the bulkhead."),
    _m("ballast_finalize_jobs_total", "counter", "Finalize jobs ended, by outcome.", ("outcome",)),
    _m("ballast_finalize_stage_duration_seconds", "histogram", "Time spent in each finalize stage.",
       ("stage",), LATENCY_BUCKETS),
    _m("ballast_mutations_committed_total", "counter", "Mutations durably committed (duplicates excluded)."),
    _m("ballast_commit_batch_size", "histogram", "Mutations per group commit.", (), BATCH_BUCKETS),
    _m("ballast_auth_denied_total", "counter", "Requests refused by authentication or authorization.",
       ("reason",)),
])


class Exporter(Protocol):
    """What an exporter (the ``metrics`` plugin) implements. Label values come in the
    catalogue's label order."""

    def inc(self, spec: MetricSpec, labels: tuple[str, ...], amount: float) -> None: ...

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None: ...

    def set(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None: ...

    def sample(self, spec: MetricSpec, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        """Read ``read()`` at each scrape (gauges whose value lives elsewhere)."""
        ...


class BindingExporter(Exporter, Protocol):
    """An exporter that can also hand out a recorder bound to one label set: the fast
    path for a hot recording point that keeps the recorder (the request counter)."""

    def bind(self, spec: MetricSpec, labels: tuple[str, ...]) -> Callable[[float], None]:
        """``inc(amount)`` for a counter, ``observe(value)`` for a histogram."""
        ...


class Tracer(Protocol):
    """What a tracer (the ``tracing`` plugin) implements: a span around a block of work.

    The span is current inside the block (work started there is its child) and ends
    with it; an exception leaving the block marks it failed (by type, never its text).
    """

    def span(self, name: str, attributes: Mapping[str, str | int]) -> AbstractContextManager[object]: ...


_NO_SPAN: AbstractContextManager[object] = nullcontext()


class _Instrument:
    __slots__ = ("_hub", "spec")

    def __init__(self, hub: Telemetry, spec: MetricSpec) -> None:
        self._hub = hub
        self.spec = spec


class _Bindable(_Instrument):
    __slots__ = ()

    def bound(self, *labels: str) -> Callable[[float], None] | None:
        """A recorder for these labels on the exporter attached now, or None without one
        (from its ``bind`` where it is a :class:`BindingExporter`, else through ``inc``
        or ``observe``).

        Cheaper per call than the instrument with its labels; a caller that keeps it
        must drop it when :attr:`Telemetry.exporter` changes.
        """
        exporter = self._hub.exporter
        if exporter is None:
            return None
        bind = getattr(exporter, "bind", None)
        if bind is not None:
            recorder: Callable[[float], None] = bind(self.spec, labels)
            return recorder
        spec = self.spec
        record = exporter.inc if spec.type == "counter" else exporter.observe
        return lambda value: record(spec, labels, value)


class Counter(_Bindable):
    __slots__ = ()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        exporter = self._hub.exporter
        if exporter is not None:
            exporter.inc(self.spec, labels, amount)


class Gauge(_Instrument):
    __slots__ = ()

    def set(self, value: float, *labels: str) -> None:
        exporter = self._hub.exporter
        if exporter is not None:
            exporter.set(self.spec, labels, value)

    def sample(self, read: Callable[[], float], *labels: str) -> None:
        """Have the exporter read ``read()`` at scrape time (now or once attached)."""
        self._hub._samplers.append((self.spec, labels, read))
        exporter = self._hub.exporter
        if exporter is not None:
            exporter.sample(self.spec, labels, read)


class Histogram(_Bindable):
    __slots__ = ()

    def observe(self, value: float, *labels: str) -> None:
        exporter = self._hub.exporter
        if exporter is not None:
            exporter.observe(self.spec, labels, value)


class Telemetry:
    """One per app (``app[TELEMETRY]``, and the ``telemetry`` argument of build hooks)."""

    def __init__(self) -> None:
        self.exporter: Exporter | None = None
        self.tracer: Tracer | None = None
        self._samplers: list[tuple[MetricSpec, tuple[str, ...], Callable[[], float]]] = []

    def _spec(self, name: str, type_: MetricType) -> MetricSpec:
        spec = METRICS.get(name)
        if spec is None:
            raise KeyError(f"{name}: not in ballast.telemetry.METRICS; declare it there first")
        if spec.type != type_:
            raise TypeError(f"{name} is a {spec.type}, not a {type_}")
        return spec

    def counter(self, name: str) -> Counter:
        return Counter(self, self._spec(name, "counter"))

    def gauge(self, name: str) -> Gauge:
        return Gauge(self, self._spec(name, "gauge"))

    def histogram(self, name: str) -> Histogram:
        return Histogram(self, self._spec(name, "histogram"))

    def span(self, name: str, **attributes: str | int) -> AbstractContextManager[object]:
        """A span around a ``with`` block; a shared no-op without a tracer attached."""
        tracer = self.tracer
        if tracer is None:
            return _NO_SPAN
        return tracer.span(name, attributes)

    def attach_tracer(self, tracer: Tracer) -> None:
        """Start making spans (the ``tracing`` plugin calls this at app build)."""
        self.tracer = tracer

    def attach(self, exporter: Exporter) -> None:
        """Start exporting; sampled gauges registered so far are handed over."""
        self.exporter = exporter
        for spec, labels, read in self._samplers:
            exporter.sample(spec, labels, read)


__all__ = ["METRICS", "BindingExporter", "Counter", "Exporter", "Gauge", "Histogram", "MetricSpec", "Reason",
           "Telemetry", "Tracer"]
