"""ballast-stamp: an example third-party Ballast plugin.

Stamps a header on every response (``X-Served-By: ballast`` by default), optionally on
every outbound upstream request, and serves ``GET /stamp`` saying what it stamps. It is
installed like any package and found through its entry point in the group
``ballast.plugins`` (see ``setup.cfg``); its settings live under ``[plugins.stamp]``.

Everything it needs comes from the top-level ``ballast`` package, the public API.
"""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web
from pydantic import Field, field_validator

from ballast import (
    Config,
    ConfigError,
    Handler,
    Middleware,
    MiddlewareSpec,
    PluginSection,
    UpstreamCall,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamWrapper,
    hookimpl,
)

#: The entry-point name: the plugin's name and its config section.
NAME = "stamp"
#: Outside the error sanitizer (order 100), so problem responses are stamped too.
ORDER = 50
#: Headers the framework or its plugins set themselves: stamping over them would break
#: clients (and ``X-Request-ID`` ties a response to the server's log lines).
RESERVED = frozenset({"content-length", "content-type", "content-encoding", "transfer-encoding",
                      "connection", "x-request-id", "retry-after", "www-authenticate",
                      "authorization", "set-cookie"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Settings(PluginSection):
    """``[plugins.stamp]``; ``enabled`` comes from :class:`ballast.PluginSection`."""

    header: str = Field("X-Served-By", min_length=1, max_length=64,
                        description="the header to set")
    value: str = Field("ballast", min_length=1, max_length=200, description="its value")
    upstream: bool = Field(False, description="also stamp outbound upstream requests")

    @field_validator("header")
    @classmethod
    def _token(cls, header: str) -> str:
        if not _TOKEN.match(header):
            raise ValueError("must be an HTTP header name (letters, digits, '-')")
        return header

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be one line")
        return value


def stamp_middleware(*, header: str, value: str) -> Middleware:
    """A middleware setting ``header: value`` on every response it sees."""

    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a response raised rather than returned
            exc.headers[header] = value
            raise
        if not response.prepared:  # a streamed response has sent its headers already
            response.headers[header] = value
        return response

    return impl


def stamp_upstream(*, header: str, value: str) -> UpstreamWrapper:
    """A wrapper adding ``header: value`` to every outbound upstream request."""

    def wrap(call: UpstreamCall) -> UpstreamCall:
        async def stamped(request: UpstreamRequest) -> UpstreamResponse:
            # A copy of the same mapping type: providers hand in header mappings that
            # hide credentials when printed, and a plain dict would not.
            headers: Any = copy.copy(request.headers)
            headers[header] = value
            return await call(replace(request, headers=headers))

        return stamped

    return wrap


# --- hooks -------------------------------------------------------------------------


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_configure(config: Config) -> None:
    settings: Settings = config.plugin(NAME)
    if settings.header.lower() in RESERVED:
        raise ConfigError(f"plugins.{NAME}.header: {settings.header!r} is set by Ballast itself; "
                          "choose another header name")


@hookimpl
def ballast_middlewares(config: Config) -> list[MiddlewareSpec]:
    settings: Settings = config.plugin(NAME)
    return [MiddlewareSpec(NAME, ORDER, stamp_middleware(header=settings.header, value=settings.value))]


@hookimpl
def ballast_upstream_wrappers(config: Config) -> list[UpstreamWrapper]:
    settings: Settings = config.plugin(NAME)
    if not settings.upstream:
        return []
    return [stamp_upstream(header=settings.header, value=settings.value)]


@hookimpl
def ballast_app_built(app: web.Application, config: Config) -> Callable[..., AsyncIterator[None]]:
    settings: Settings = config.plugin(NAME)

    async def describe(request: web.Request) -> web.Response:
        return web.json_response({"header": settings.header, "value": settings.value,
                                  "upstream": settings.upstream})

    app.router.add_get("/stamp", describe)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # Set-up before the yield, teardown after: nothing to hold in this example.
        yield

    return lifetime
