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
    return [web.middleware(s.middleware) for s in sorted(specs, key=lambda s: s.order)]
