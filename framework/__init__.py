"""Ballast: a plugin-based reliability framework over aiohttp.

The names a plugin author needs are importable from here::

    from ballast import hookimpl, PluginSection, MiddlewareSpec, UpstreamRequest

They are resolved on first use, so importing one ``ballast`` module does not import
the rest. Everything else is internal to its module and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ballast.config import Config, PluginSection
    from ballast.errors import (
        BallastError,
        BudgetExceeded,
        ClientError,
        ConfigError,
        Overloaded,
        UpstreamError,
    )
    from ballast.executor import BlockingExecutor
    from ballast.hookspecs import hookimpl, hookspec
    from ballast.middleware import Handler, Middleware, MiddlewareSpec
    from ballast.resilience import UpstreamRefused, UpstreamRegistry
    from ballast.upstream import (
        AttemptWrapperSpec,
        ClientProvider,
        UpstreamCall,
        UpstreamRequest,
        UpstreamResponse,
        UpstreamWrapper,
    )

#: public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "hookimpl": "ballast.hookspecs",
    "hookspec": "ballast.hookspecs",
    "Config": "ballast.config",
    "PluginSection": "ballast.config",
    "Handler": "ballast.middleware",
    "Middleware": "ballast.middleware",
    "MiddlewareSpec": "ballast.middleware",
    "ClientProvider": "ballast.upstream",
    "UpstreamCall": "ballast.upstream",
    "UpstreamRequest": "ballast.upstream",
    "UpstreamResponse": "ballast.upstream",
    "UpstreamWrapper": "ballast.upstream",
    "AttemptWrapperSpec": "ballast.upstream",
    "UpstreamRefused": "ballast.resilience",
    "UpstreamRegistry": "ballast.resilience",
    "BlockingExecutor": "ballast.executor",
    "BallastError": "ballast.errors",
    "BudgetExceeded": "ballast.errors",
    "ClientError": "ballast.errors",
    "ConfigError": "ballast.errors",
    "Overloaded": "ballast.errors",
    "UpstreamError": "ballast.errors",
}

__all__ = [
    "AttemptWrapperSpec",
    "BallastError",
    "BlockingExecutor",
    "BudgetExceeded",
    "ClientError",
    "ClientProvider",
    "Config",
    "ConfigError",
    "Handler",
    "Middleware",
    "MiddlewareSpec",
    "Overloaded",
    "PluginSection",
    "UpstreamCall",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamRegistry",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamWrapper",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ballast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
