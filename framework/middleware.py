"""What a plugin hands back for the request path: a named, ordered aiohttp middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class MiddlewareSpec:
    """``order``: lower is outer. Builtins use 100 (sanitizer) and 200 (timeout budget)."""

    name: str
    order: int
    middleware: Middleware


def ordered(specs: list[MiddlewareSpec]) -> list[Any]:
    """Middlewares outermost first; ties keep registration order."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"middleware name used twice: {', '.join(dupes)}")
    return [_new_style(s.middleware) for s in sorted(specs, key=lambda s: s.order)]


def _new_style(mw: Middleware) -> Any:
    """Mark ``mw`` as a new-style aiohttp middleware.

    aiohttp marks one by setting an attribute on it, which a bound method (a plugin
    object's ``async def middleware(self, request, handler)``) cannot carry; such a
    callable is wrapped in a function that can.
    """
    try:
        return web.middleware(mw)
    except AttributeError:
        async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await mw(request, handler)

        return web.middleware(impl)
