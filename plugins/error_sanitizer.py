"""error_sanitizer: no exception text, path, host or secret ever reaches a client.

The outermost plugin middleware. Whatever goes wrong below it (a handler, another
plugin's middleware) reaches the client as an ``application/problem+json`` body with a
generic, stable title and detail for its status and the request id; the full error
(type, message, traceback without local variables or file paths) goes to the server log as
``error.unhandled`` with the same request id. Typed errors keep their public text
(which the raise site chose to be safe); a client's validation errors keep their
field-level explanation, since that is the client's own input.

Disabled: typed errors still become problems in the core, but an unexpected exception
becomes aiohttp's plain-text 500 and is logged only by aiohttp's own logger.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback

from aiohttp import web
from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.errors import BallastError, Overloaded
from ballast.hookspecs import hookimpl
from ballast.keys import REQUEST_ID
from ballast.logging import get_logger
from ballast.middleware import Handler, Middleware, MiddlewareSpec
from ballast.problems import error_response, generic_response, is_problem
from ballast.resilience import UpstreamRefused

ORDER = 100
log = get_logger("ballast.errors")


class Settings(PluginSection):
    log_client_errors: bool = Field(
        False, description="also log 4xx typed errors (at info level) with their internal detail")
    max_traceback_frames: int = Field(
        30, ge=1, le=200, description="frames kept in the logged traceback (innermost last)")


def _module_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            names.setdefault(os.path.realpath(path), name)
    return names


_MODULES: dict[str, str] = {}


def _module_of(filename: str) -> str:
    """The module a frame's file is, by its import name: a traceback names no file path."""
    if filename.startswith("<"):
        return filename  # <string>, <frozen ...>: no path
    path = os.path.realpath(filename)
    name = _MODULES.get(path)
    if name is None:  # a module imported since: look again, once per file
        _MODULES.update(_module_names())
        name = _MODULES.setdefault(path, os.path.splitext(os.path.basename(path))[0])
    return name


def _format_traceback(exc: BaseException, limit: int) -> str:
    """The traceback (chained causes included, innermost ``limit`` frames of each) with
    every frame's file given as its module's import name; never local variables."""
    formatted = traceback.TracebackException.from_exception(exc, limit=-limit)
    pending: list[traceback.TracebackException] = [formatted]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for frame in current.stack:
            frame.filename = _module_of(frame.filename)
        pending.extend(t for t in (current.__cause__, current.__context__) if t is not None)
    return "".join(formatted.format())


def sanitizer(*, log_client_errors: bool = False, max_traceback_frames: int = 30) -> Middleware:
    """The middleware; settings are checked once here, not per request."""
    if max_traceback_frames < 1:
        raise ValueError("max_traceback_frames must be >= 1")

    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except BallastError as exc:
            rid = request.get(REQUEST_ID, "")
            if isinstance(exc, Overloaded | UpstreamRefused):
                # Shedding load (or refusing to call a sick upstream) is the plan working,
                # not a fault: it was logged already (bulkhead.rejected, upstream.refused),
                # and a traceback per refused request would add to the load.
                pass
            elif exc.status >= 500:
                log.error("error.unhandled", error_type=type(exc).__name__, error=exc.internal,
                          status=exc.status, traceback=_format_traceback(exc, max_traceback_frames))
            elif log_client_errors:
                log.info("error.client", error_type=type(exc).__name__, error=exc.internal,
                         status=exc.status)
            return error_response(exc, rid)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own errors (routing, body size, ...): its text may quote
            # internals, so only the status survives.
            allow = exc.headers.get("Allow")
            return generic_response(exc.status, request.get(REQUEST_ID, ""),
                                    headers={"Allow": allow} if allow else None)
        except Exception as exc:
            log.error("error.unhandled", error_type=type(exc).__name__, error=str(exc), status=500,
                      traceback=_format_traceback(exc, max_traceback_frames))
            return generic_response(500, request.get(REQUEST_ID, ""))
        if response.status >= 400 and not response.prepared and not is_problem(response):
            # A handler returned a plain error response: keep the status, drop the body.
            return generic_response(response.status, request.get(REQUEST_ID, ""))
        return response

    return impl


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_middlewares(config: Config) -> list[MiddlewareSpec]:
    s: Settings = config.plugin("error_sanitizer")
    mw = sanitizer(log_client_errors=s.log_client_errors, max_traceback_frames=s.max_traceback_frames)
    return [MiddlewareSpec("error_sanitizer", ORDER, mw)]
