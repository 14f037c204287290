"""The application factory: config + plugins -> one composed ``aiohttp`` application.

Every hook is called here, once. The request path that results is a plain chain:
the core request-context middleware (request id, canonical log line, typed errors to
problems), then the plugins' middlewares in their declared order, then the handler.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from ballast import logging as blog
from ballast.config import Config
from ballast.errors import BallastError
from ballast.executor import BlockingExecutor, LoopDefaultExecutor
from ballast.http_server import SERVER_NAME
from ballast.keys import (
    CONFIG,
    EXECUTOR,
    LOG_FIELDS,
    MAX_BODY,
    PLUGINS,
    REQUEST_ID,
    STATE,
    TELEMETRY,
    UPSTREAM,
)
from ballast.middleware import Handler, MiddlewareSpec, ordered
from ballast.plugin_manager import Plugins, load_plugins
from ballast.problems import error_response, generic_response, problem_response
from ballast.telemetry import Counter, Histogram, Telemetry
from ballast.upstream import build_upstream

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
log = blog.get_logger("ballast.app")


# Request ids are correlation ids, not secrets (a client may choose its own), so they
# come from a per-process generator seeded from the OS rather than a system call each.
_ids = random.Random(os.urandom(32))


def new_request_id() -> str:
    """32 random hex digits."""
    return f"{_ids.getrandbits(128):032x}"


def request_id_of(request: web.Request) -> str:
    rid = request.get(REQUEST_ID)
    return rid if isinstance(rid, str) else ""


def _route_of(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "(unmatched)"


#: Methods counted under their own name; any other is counted as "OTHER" (bounded labels).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _RequestMetrics:
    """The request counter and latency histogram, taken once per app at build.

    Recorders bound to each (method, route, status) are kept, for the exporter attached
    when they were made: one dict lookup and two calls per request instead of resolving
    the labels on every call.
    """

    __slots__ = ("_bound", "_exporter", "duration", "requests", "telemetry")

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.requests: Counter = telemetry.counter("ballast_http_requests_total")
        self.duration: Histogram = telemetry.histogram("ballast_http_request_duration_seconds")
        self._exporter: object = None
        self._bound: dict[tuple[str, str, int], tuple[Callable[[float], None], Callable[[float], None]]] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        exporter = self.telemetry.exporter
        if exporter is None:
            return
        if exporter is not self._exporter:
            self._exporter, self._bound = exporter, {}
        key = (method, route, status)
        pair = self._bound.get(key)
        if pair is None:
            if len(self._bound) >= _MAX_BOUND:  # unmatched paths share "(unmatched)"; still, bounded
                self._bound.clear()
            inc = self.requests.bound(method if method in _METHODS else "OTHER", route, str(status))
            observe = self.duration.bound(route)
            assert inc is not None and observe is not None, "an exporter is attached"
            pair = self._bound[key] = (inc, observe)
        pair[0](1.0)
        pair[1](seconds)


#: Bound recorders kept per app, at most (methods x routes x statuses seen).
_MAX_BOUND = 4096


_REQUEST_METRICS = web.AppKey("ballast_request_metrics", _RequestMetrics)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id, contextvars, typed errors -> problems, the canonical line."""
    start = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if _REQUEST_ID_RE.match(incoming) else new_request_id()
    request[REQUEST_ID] = rid
    sid = request.match_info.get("session_id")
    if sid is not None:
        sid = sid[:64]
    status = 500
    # bind/reset rather than bound_contextvars(): the same effect without its scan of
    # every context variable on entry and exit, which shows on every request.
    tokens = structlog.contextvars.bind_contextvars(
        request_id=rid, **({} if sid is None else {"session_id": sid}))
    try:
        try:
            resp = await handler(request)
        except BallastError as exc:
            resp = error_response(exc, rid)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect: aiohttp sends it as it is
                status = exc.status
                raise
            resp = generic_response(exc.status, rid, headers=_allow_header(exc))
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-ID"] = rid
            if status in (413, 415) and request.body_exists and not request.content.is_eof():
                # A body refused for its size or encoding is not drained: close instead.
                # (Other refusals let aiohttp read out the rest briefly, so a client
                # still sending gets to read its answer.)
                resp.force_close()
        return resp
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
        seconds = time.perf_counter() - start
        route = _route_of(request)
        request.app[_REQUEST_METRICS].record(request.method, route, status, seconds)
        extra = request.get(LOG_FIELDS)  # e.g. the trace id, from the tracing plugin
        blog.request_line(request.method, route, request.path, status, round(seconds * 1000, 3), rid,
                          **({} if sid is None else {"session_id": sid}), **(extra or {}))


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # Checks registered by resources (a store whose writer died): a reason, or None.
    failed = next((r for r in (check() for check in state.get("checks", ())) if r), None)
    if state.get("ready") and not state.get("draining") and failed is None:
        return web.json_response({"status": "ready"})
    reason = failed or ("draining" if state.get("draining") else "starting")
    return problem_response(503, "Not ready", f"The server is {reason}.", request_id_of(request),
                            headers={"Retry-After": "1"})


def build_app(config: Config, plugins: Plugins | None = None) -> web.Application:
    """Build the application for ``config``; loads plugins unless they are given."""
    plugins = plugins or load_plugins(config)
    hook = plugins.hook
    telemetry = Telemetry()
    # pluggy returns the last registered plugin's result first; reversed, results come
    # in registration order (ties in middleware order, wrappers first-is-outermost).
    specs: list[MiddlewareSpec] = [
        s for group in reversed(hook.ballast_middlewares(config=config, telemetry=telemetry)) for s in group]
    max_body = config.settings.server.max_body_bytes
    app = web.Application(middlewares=[request_context, *ordered(specs)], client_max_size=max_body)
    app[CONFIG] = config
    app[PLUGINS] = plugins
    app[MAX_BODY] = max_body
    app[STATE] = {"ready": False, "draining": False}
    app[TELEMETRY] = telemetry
    app[_REQUEST_METRICS] = _RequestMetrics(telemetry)

    executor: BlockingExecutor | None = hook.ballast_executor(config=config, telemetry=telemetry)
    if executor is None:
        fallback = executor = LoopDefaultExecutor()
        telemetry.gauge("ballast_executor_in_use").sample(lambda: fallback.in_flight)
    app[EXECUTOR] = executor
    app[UPSTREAM] = build_upstream(hook, config, telemetry)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    from ballast.sessions.openapi import openapi_handler
    from ballast.sessions.routes import setup_sessions

    app.router.add_get("/openapi.json", openapi_handler)
    app.cleanup_ctx.append(_resources)  # before sessions: torn down after them
    setup_sessions(app)
    for extra in hook.ballast_app_built(app=app, config=config):
        if extra is not None:
            app.cleanup_ctx.append(extra)
    app.on_response_prepare.append(_security_headers)
    app.on_startup.append(_mark_ready)
    app.on_shutdown.append(_mark_draining)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """The executor and outbound client live as long as the app."""
    yield
    await app[UPSTREAM].close()
    app[EXECUTOR].shutdown()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response: no MIME sniffing, no versions; ``/v1`` data is never cached."""
    headers = response.headers
    headers["Server"] = SERVER_NAME
    headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith("/v1/"):
        headers["Cache-Control"] = "no-store"


async def _mark_ready(app: web.Application) -> None:
    app[STATE]["ready"] = True
    log.info("server.ready")


async def _mark_draining(app: web.Application) -> None:
    app[STATE]["draining"] = True
