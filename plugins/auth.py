"""auth: API keys on every ``/v1`` route, scopes, tenants and a per-key rate limit.

Without it, anyone who can reach the server can read, change and finalize every
session. With it, a request to ``/v1`` (and to ``/metrics`` when ``protect_metrics``)
must carry ``Authorization: Bearer <key>`` for a key created by ``ballast keys
create``; the key's tenant becomes the request's tenant (``ballast.keys.TENANT``), which
the session core uses to scope every read and write.

* No key, a malformed header, an unknown or revoked key: 401 problem with
  ``WWW-Authenticate: Bearer``. The same detail for each, so the answer says nothing
  about which keys exist.
* A known key whose scope does not allow the request: 403. ``read`` allows GET, HEAD
  and OPTIONS; ``write`` adds the rest of ``/v1``; ``admin`` adds ``/metrics``.
* Each key has a token bucket (``rate_per_s`` tokens a second, up to ``burst``); past it,
  429 with ``Retry-After``.
* Every refusal is logged as ``auth.denied`` (reason, key id when known, method, route;
  never the key) and counted in ``ballast_auth_denied_total{reason}``.

Keys are checked by the SHA-256 of what was presented (see :mod:`ballast.apikeys`);
the keys file is re-read within about a second of a change, so ``ballast keys revoke``
takes effect without a restart.

Disabled (the default, so the two-command local start works): no request is checked,
every request acts for the ``default`` tenant; ``ballast serve`` refuses to listen on a
non-loopback address unless ``server.allow_unauthenticated`` is true.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from pydantic import Field

from ballast.apikeys import MAX_KEY_LENGTH, KeyTable, Scope
from ballast.config import Config, PluginSection
from ballast.errors import ClientError
from ballast.hookspecs import hookimpl
from ballast.keys import TENANT
from ballast.logging import get_logger
from ballast.middleware import Handler, Middleware, MiddlewareSpec
from ballast.telemetry import Telemetry

#: Inside the sanitizer (100), outside every other plugin: a refusal costs the least.
ORDER = 120
log = get_logger("ballast.auth")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UNAUTHORIZED_DETAIL = "A valid API key is required: send 'Authorization: Bearer <key>'."
_SCOPE_RANK = {"read": 0, "write": 1, "admin": 2}


class Settings(PluginSection):
    enabled: bool = False
    keys_file: str = Field("var/keys.toml", min_length=1,
                           description="the keys file written by `ballast keys` (hashes only)")
    rate_per_s: float = Field(50.0, gt=0, le=1_000_000, description="requests a second per key, sustained")
    burst: int = Field(100, ge=1, le=1_000_000, description="requests a key may send at once")
    protect_metrics: bool = Field(False, description="require an admin key for GET /metrics")


class TokenBuckets:
    """One token bucket per key id; ``take`` answers 0 (allowed) or seconds to wait."""

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}

    def take(self, key_id: str) -> float:
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


def bearer_key(header: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>``, or None if the header is not that."""
    if not header or len(header) > MAX_KEY_LENGTH + 16:
        return None
    scheme, _, rest = header.strip().partition(" ")
    key = rest.strip()
    if scheme.lower() != "bearer" or not key or " " in key or not key.isascii() or not key.isprintable():
        return None
    return key


def _allows(scope: Scope, method: str, admin_only: bool) -> bool:
    if admin_only:
        return scope == "admin"
    return method in READ_METHODS or _SCOPE_RANK[scope] >= _SCOPE_RANK["write"]


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


def authenticator(table: KeyTable, buckets: TokenBuckets, telemetry: Telemetry, *,
                  protect_metrics: bool = False) -> Middleware:
    """The middleware; the key table and buckets are built once, at app build."""
    denied = telemetry.counter("ballast_auth_denied_total")

    def refuse(request: web.Request, reason: str, key_id: str | None, exc: ClientError) -> ClientError:
        denied.inc(reason)
        log.info("auth.denied", reason=reason, key_id=key_id, method=request.method,
                 route=_route(request))
        return exc

    def unauthorized(request: web.Request, reason: str, key_id: str | None = None) -> ClientError:
        challenge = 'Bearer realm="ballast"' if reason == "missing" else \
            'Bearer realm="ballast", error="invalid_token"'
        return refuse(request, reason, key_id, ClientError(
            UNAUTHORIZED_DETAIL, status=401, title="Unauthorized",
            headers={"WWW-Authenticate": challenge}))

    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        path, route = request.path, _route(request)
        admin_only = protect_metrics and (path == "/metrics" or route == "/metrics")
        # The matched route is checked too: whatever spelling of a path the router
        # resolves to a /v1 resource is protected like the plain one.
        if not (admin_only or path == "/v1" or path.startswith("/v1/") or route.startswith("/v1/")):
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            raise unauthorized(request, "missing")
        key = bearer_key(header)
        if key is None:
            raise unauthorized(request, "malformed")
        found = table.lookup(key)
        record = found.record
        if record is None:
            raise unauthorized(request, "unknown")
        if found.reason == "revoked":
            raise unauthorized(request, "revoked", record.id)
        if not _allows(record.scope, request.method, admin_only):
            raise refuse(request, "scope", record.id, ClientError(
                f"This key's scope ({record.scope}) does not allow {request.method} here.",
                status=403, title="Forbidden"))
        wait = buckets.take(record.id)
        if wait > 0:
            raise refuse(request, "rate_limited", record.id, ClientError(
                "This key is over its request rate; retry after the time in Retry-After.",
                status=429, title="Too many requests",
                headers={"Retry-After": str(max(1, math.ceil(wait)))}))
        request[TENANT] = record.tenant
        return await handler(request)

    return impl


def key_table(path: Path) -> KeyTable:
    def on_reload(count: int) -> None:
        log.info("auth.keys_loaded", keys=count)

    def on_error(reason: str) -> None:
        log.error("auth.keys_invalid", reason=reason)

    table = KeyTable(path, on_reload=on_reload, on_error=on_error)
    if not path.exists():
        log.warning("auth.keys_missing", keys_file=str(path))
    return table


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_middlewares(config: Config, telemetry: Telemetry) -> list[MiddlewareSpec]:
    s: Settings = config.plugin("auth")
    mw = authenticator(key_table(Path(s.keys_file)), TokenBuckets(s.rate_per_s, s.burst), telemetry,
                       protect_metrics=s.protect_metrics)
    return [MiddlewareSpec("auth", ORDER, mw)]
