"""HTTP handlers of the session API (v1) and their wiring into the app.

Handlers only translate: validate input with the models, call the service, serialise.
Every error they raise is typed (:mod:`ballast.errors`) and becomes a problem
response in the request path. Every handler acts for the request's tenant
(:func:`ballast.keys.tenant_of`), and the service sees only that tenant's sessions.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from ballast.errors import ClientError, ConfigError, NotFound
from ballast.inference import DEGRADED_HEADER, InferenceProvider, wrap_provider
from ballast.keys import CONFIG, EXECUTOR, PLUGINS, STATE, TELEMETRY, UPSTREAM, tenant_of
from ballast.logging import get_logger, register_secret
from ballast.problems import read_json, read_model, validate
from ballast.sessions import models as m
from ballast.sessions.backends import make_store
from ballast.sessions.builtin import BuiltinProvider
from ballast.sessions.patience import run_blocking_for
from ballast.sessions.service import SessionService

SERVICE = web.AppKey("ballast_sessions", SessionService)
_SESSION_ID = re.compile(m.SESSION_ID_PATTERN)
log = get_logger("ballast.sessions")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _session_id(request: web.Request) -> str:
    sid = request.match_info["session_id"]
    if not _SESSION_ID.match(sid):
        raise NotFound(f"Session ids match {m.SESSION_ID_PATTERN}; no session has this id.")
    return sid


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ClientError(f"Query parameter '{name}' must be an integer.") from None
    if not lo <= value <= hi:
        raise ClientError(f"Query parameter '{name}' must be between {lo} and {hi}.")
    return value


async def create_session(request: web.Request) -> web.Response:
    body = await read_model(request, m.CreateSession)
    sid = body.session_id or secrets.token_urlsafe(12).replace("-", "_")
    view = await request.app[SERVICE].create(tenant_of(request), sid, body.title,
                                             [p.name for p in body.participants])
    return _json(view, 201)


async def get_session(request: web.Request) -> web.Response:
    return _json(await request.app[SERVICE].get(tenant_of(request), _session_id(request)))


async def append_mutations(request: web.Request) -> web.Response:
    sid = _session_id(request)
    batch = await read_model(request, m.MutationBatch)
    # One dump of the whole batch: the same dicts as dumping each item, for half the cost.
    mutations: list[dict[str, Any]] = batch.model_dump(exclude_none=False)["mutations"]
    return _json(await request.app[SERVICE].append(tenant_of(request), sid, mutations))


async def list_mutations(request: web.Request) -> web.Response:
    sid = _session_id(request)
    after = _int_param(request, "after", 0, 0, 2**53)
    limit = _int_param(request, "limit", 100, 1, 1000)
    return _json(await request.app[SERVICE].list_mutations(tenant_of(request), sid, after, limit))


async def _no_body(request: web.Request) -> None:
    """Action endpoints take no body; an empty JSON object is accepted too."""
    if request.body_exists:
        data = await read_json(request)
        validate(m.EmptyBody, data)


async def resolve(request: web.Request) -> web.Response:
    sid = _session_id(request)
    await _no_body(request)
    return _marked(await request.app[SERVICE].resolve(tenant_of(request), sid))


async def start_finalize(request: web.Request) -> web.Response:
    sid = _session_id(request)
    await _no_body(request)
    return _json({"job": await request.app[SERVICE].start_finalize(tenant_of(request), sid)}, 202)


async def get_finalize(request: web.Request) -> web.Response:
    sid = _session_id(request)
    wait = _wait_param(request)
    service = request.app[SERVICE]
    if wait is None:
        return _json({"job": await service.get_job(tenant_of(request), sid)})
    job = await service.wait_job(tenant_of(request), sid, wait, lambda: _connected(request))
    return _json({"job": job})


async def list_sessions(request: web.Request) -> web.Response:
    after = request.query.get("after")
    if after is not None and not _SESSION_ID.match(after):
        raise ClientError(f"Query parameter 'after' must be a session id ({m.SESSION_ID_PATTERN}).")
    limit = _int_param(request, "limit", m.SESSION_PAGE_DEFAULT, 1, m.SESSION_PAGE_MAX)
    return _json(await request.app[SERVICE].list_sessions(tenant_of(request), after, limit))


def _wait_param(request: web.Request) -> float | None:
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= m.MAX_WAIT_S:  # also refuses nan
        raise ClientError(f"Query parameter 'wait' must be a number of seconds from 0 to {m.MAX_WAIT_S}.")
    return value


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def get_report(request: web.Request) -> web.Response:
    return _marked(await request.app[SERVICE].get_report(tenant_of(request), _session_id(request)))


def _marked(data: dict[str, Any]) -> web.Response:
    """A degraded answer (``"degraded": true``) says so in a header too."""
    response = _json(data)
    if data.get("degraded") is True:
        response.headers[DEGRADED_HEADER] = "inference"
    return response


def make_provider(app: web.Application) -> InferenceProvider:
    settings = app[CONFIG].settings.inference
    if settings.provider == "builtin":
        return BuiltinProvider(run_blocking_for(app[EXECUTOR]))
    from ballast.sessions.openai import OpenAIProvider

    if not settings.base_url:
        raise ConfigError("inference.base_url: required when inference.provider is 'openai'")
    key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    register_secret(key)
    return OpenAIProvider(app[UPSTREAM], base_url=settings.base_url, model=settings.model,
                          api_key=key, timeout_ms=settings.timeout_ms,
                          run_blocking=run_blocking_for(app[EXECUTOR]))


def _failure_hook(app: web.Application) -> Any:
    config = app[CONFIG]
    impls = app[PLUGINS].hook.ballast_mutation_failed.get_hookimpls()

    def notify(session_id: str, mutations: list[dict[str, Any]], error: BaseException) -> None:
        args = {"config": config, "session_id": session_id, "mutations": mutations, "error": error}
        # Each implementation on its own: one that raises must not silence the others,
        # and a notification must never break the queue.
        for impl in reversed(impls):
            try:
                impl.function(*(args[name] for name in impl.argnames))
            except Exception as exc:
                log.error("hook.failed", hook="ballast_mutation_failed", plugin=impl.plugin_name,
                          session_id=session_id, error_type=type(exc).__name__)

    return notify


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    storage = config.settings.storage
    store = make_store(config, _failure_hook(app), telemetry=app[TELEMETRY])
    await store.open()
    # Readiness reports a store whose writer has died.
    app[STATE].setdefault("checks", []).append(
        lambda: None if store.failure is None else "unable to store data")
    hook = app[PLUGINS].hook
    inference_wrappers = hook.ballast_inference_wrappers(
        config=config, telemetry=app[TELEMETRY], run_blocking=run_blocking_for(app[EXECUTOR]))
    provider = wrap_provider(make_provider(app), [w for group in reversed(inference_wrappers) for w in group])
    # Registration order, first outermost (pluggy returns the last registered first).
    groups = app[PLUGINS].hook.ballast_finalize_wrappers(config=config, telemetry=app[TELEMETRY])
    wrappers = [w for group in reversed(groups) for w in group]
    service = SessionService(store, app[EXECUTOR], provider, wrappers, lease_s=storage.job_lease_s,
                             telemetry=app[TELEMETRY])
    app[SERVICE] = service
    await service.start()
    try:
        yield
    finally:
        await service.close()
        await provider.close()
        await store.close()


def setup_sessions(app: web.Application) -> None:
    app.cleanup_ctx.append(_sessions_ctx)
    r = app.router
    r.add_post("/v1/sessions", create_session)
    r.add_get("/v1/sessions", list_sessions)
    r.add_get("/v1/sessions/{session_id}", get_session)
    r.add_post("/v1/sessions/{session_id}/mutations", append_mutations)
    r.add_get("/v1/sessions/{session_id}/mutations", list_mutations)
    r.add_post("/v1/sessions/{session_id}/resolve", resolve)
    r.add_post("/v1/sessions/{session_id}/finalize", start_finalize)
    r.add_get("/v1/sessions/{session_id}/finalize", get_finalize)
    r.add_get("/v1/sessions/{session_id}/report", get_report)
