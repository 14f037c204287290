"""tracing: follow one request from the client's trace into every upstream attempt.

A slow resolve is slow somewhere: in the handler, in a retry's backoff, in the third
attempt against a struggling upstream. Logs say that per line; a trace shows it as one
tree across services. This plugin makes OpenTelemetry spans (``opentelemetry-api`` /
``-sdk``), per app:

* a **server span** per request (middleware order 50, outside the sanitizer so it sees
  the status the client gets and covers the sanitizer's own log lines), named
  ``METHOD /route/template``. An incoming W3C ``traceparent`` makes it a child of the
  caller's span (same trace id); sampling follows the caller's decision, else
  ``sample_ratio``;
* a **client span** per upstream attempt actually sent (attempt wrapper order 900,
  inside the breaker and the cooldown), with ``traceparent`` injected into that
  attempt's outbound headers, so the upstream sees the same trace;
* a ``finalize`` span per finalize job run and a ``finalize <stage>`` span per stage
  (the core opens ``telemetry.span(...)`` around the job and each stage; this plugin
  attaches the :class:`~ballast.telemetry.Tracer` that makes them real).

Every log line written inside a span carries ``trace_id`` and ``span_id`` (bound with
structlog's contextvars for the span's duration; the canonical ``http.request`` line
gets the server span's ids). Spans carry route templates, upstream names, attempt
numbers and status codes, never URLs, hosts, headers or exception text: a failed span
names only the error's type or reason code.

Exporters: ``otlp`` (OTLP over HTTP to ``endpoint``; needs the ``otlp`` extra,
``pip install 'ballast[otlp]'``, and says so at start if it is missing), ``console``
(JSON spans on stderr, apart from the log lines on stdout) or ``none`` (spans are made
and propagated, trace ids reach the logs and the upstream, nothing is exported).

Disabled (the default): no spans, no ``traceparent`` sent, no trace ids in logs; the
request path does not even look at the ``traceparent`` header.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import structlog
from aiohttp import web
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.errors import ConfigError
from ballast.hookspecs import hookimpl
from ballast.keys import LOG_FIELDS, TELEMETRY
from ballast.middleware import Handler, MiddlewareSpec
from ballast.resilience import UpstreamRegistry
from ballast.telemetry import Telemetry
from ballast.upstream import Attempt, AttemptWrapperSpec, UpstreamRequest, UpstreamResponse

#: Middleware order: outside the sanitizer (100), so the span covers everything.
ORDER = 50
#: Attempt-wrapper order: inside the breaker (100) and the cooldown (200): only attempts
#: that are really sent get a client span.
ATTEMPT_ORDER = 900
#: Where the OTLP exporter lives (the ``otlp`` extra).
OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
OTLP_MISSING = ("plugins.tracing.exporter: \"otlp\" needs the OTLP exporter package, which is "
                "not installed; install the extra with `pip install 'ballast[otlp]'`, or set "
                "plugins.tracing.exporter to \"console\" or \"none\"")


class Settings(PluginSection):
    enabled: bool = Field(default=False, description="off by default")
    exporter: Literal["otlp", "console", "none"] = Field(
        default="otlp", description="where finished spans go")
    endpoint: str = Field(default="http://127.0.0.1:4318/v1/traces",
                          description="the OTLP/HTTP traces endpoint (exporter otlp)")
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0,
                                description="share of new traces recorded (a caller's decision wins)")
    service_name: str = Field(default="ballast", min_length=1, description="service.name of the spans")


def _otlp_exporter(endpoint: str) -> SpanExporter:
    try:
        module = importlib.import_module(OTLP_MODULE)
    except ImportError:
        raise ConfigError(OTLP_MISSING) from None
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=endpoint)
    return exporter


def make_exporter(settings: Settings) -> SpanExporter | None:
    """The span exporter the settings name (None for ``none``)."""
    if settings.exporter == "none":
        return None
    if settings.exporter == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    return _otlp_exporter(settings.endpoint)


def _ids(span: Span) -> dict[str, str]:
    ctx = span.get_span_context()
    return {"trace_id": format_trace_id(ctx.trace_id), "span_id": format_span_id(ctx.span_id)}


def _failed(span: Span, what: str) -> None:
    span.set_attribute("error.type", what)
    span.set_status(Status(StatusCode.ERROR, what))


def _copy_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # Keep the caller's mapping type (the openai provider's hides credentials in repr).
    if isinstance(headers, dict):
        copied: dict[str, str] = type(headers)(headers)
        return copied
    return dict(headers)


class AppTracing:
    """One app's tracer provider, tracer and the pieces built from them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create({"service.name": settings.service_name}))
        exporter = make_exporter(settings)
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("ballast")
        self.propagator = TraceContextTextMapPropagator()

    # -- any span: current for the block, ids bound to the log lines written in it --------

    @contextmanager
    def _current(self, name: str, kind: SpanKind, attributes: Mapping[str, str | int],
                 context: Any = None) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
                name, context=context, kind=kind, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            tokens = structlog.contextvars.bind_contextvars(**_ids(span))
            try:
                yield span
            except web.HTTPException as exc:  # an answer (a redirect), failed only if 5xx
                if exc.status >= 500:
                    _failed(span, str(exc.status))
                raise
            except BaseException as exc:
                _failed(span, getattr(exc, "kind", None) or type(exc).__name__)
                raise
            finally:
                structlog.contextvars.reset_contextvars(**tokens)

    # -- the Tracer protocol of ballast.telemetry (finalize stages) -------------------------

    def span(self, name: str, attributes: Mapping[str, str | int]) -> AbstractContextManager[object]:
        return self._current(name, SpanKind.INTERNAL,
                             {f"ballast.{k}": v for k, v in attributes.items()})

    # -- server span -------------------------------------------------------------------------

    def middleware(self) -> Callable[[web.Request, Handler], Any]:
        propagator = self.propagator

        async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "(unmatched)"
            parent = propagator.extract(request.headers)
            with self._current(f"{request.method} {route}", SpanKind.SERVER,
                               {"http.request.method": request.method, "http.route": route},
                               context=parent) as span:
                request[LOG_FIELDS] = _ids(span)
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    span.set_attribute("http.response.status_code", exc.status)
                    raise
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, str(response.status)))
                return response

        return impl

    # -- client span per attempt -------------------------------------------------------------

    def attempt_wrapper(self, attempt: Attempt) -> Attempt:
        propagator = self.propagator

        async def traced(request: UpstreamRequest) -> UpstreamResponse:
            with self._current(f"{request.method} {request.upstream}", SpanKind.CLIENT,
                               {"http.request.method": request.method,
                                "ballast.upstream": request.upstream,
                                "ballast.operation": request.name,
                                "ballast.attempt": request.attempt}) as span:
                headers = _copy_headers(request.headers)
                propagator.inject(headers)  # the current span: this attempt's
                response = await attempt(dataclasses.replace(request, headers=headers))
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500 or response.status == 429:
                    span.set_status(Status(StatusCode.ERROR, str(response.status)))
                return response

        return traced

    async def shutdown(self) -> None:
        # Flushing may wait on the exporter's network: not on the event loop.
        await asyncio.to_thread(self.provider.shutdown)


#: The app's tracing (tests add span processors to its provider).
TRACING = web.AppKey("ballast_tracing", AppTracing)

# The build hooks of one app share one AppTracing; they all receive the app's Telemetry.
_per_app: weakref.WeakKeyDictionary[Telemetry, AppTracing] = weakref.WeakKeyDictionary()


def _tracing(config: Config, telemetry: Telemetry) -> AppTracing:
    tracing = _per_app.get(telemetry)
    if tracing is None:
        tracing = _per_app[telemetry] = AppTracing(config.plugin("tracing"))
        telemetry.attach_tracer(tracing)
    return tracing


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_configure(config: Config) -> None:
    s: Settings = config.plugin("tracing")
    if s.exporter == "otlp":
        try:
            importlib.import_module(OTLP_MODULE)
        except ImportError:
            raise ConfigError(OTLP_MISSING) from None


@hookimpl
def ballast_middlewares(config: Config, telemetry: Telemetry) -> list[MiddlewareSpec]:
    return [MiddlewareSpec("tracing", ORDER, _tracing(config, telemetry).middleware())]


@hookimpl
def ballast_upstream_attempt_wrappers(config: Config, telemetry: Telemetry,
                                      upstreams: UpstreamRegistry) -> list[AttemptWrapperSpec]:
    return [AttemptWrapperSpec("tracing", ATTEMPT_ORDER, _tracing(config, telemetry).attempt_wrapper)]


@hookimpl
def ballast_app_built(app: web.Application,
                      config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    tracing = _tracing(config, app[TELEMETRY])
    app[TRACING] = tracing

    async def flush_on_shutdown(app: web.Application) -> AsyncIterator[None]:
        yield
        await tracing.shutdown()

    return flush_on_shutdown
