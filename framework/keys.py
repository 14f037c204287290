"""Typed application and request keys, in one place so every module agrees on them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ballast.config import Config
from ballast.executor import BlockingExecutor
from ballast.plugin_manager import Plugins
from ballast.telemetry import Telemetry
from ballast.upstream import Upstream

CONFIG = web.AppKey("ballast_config", Config)
PLUGINS = web.AppKey("ballast_plugins", Plugins)
EXECUTOR: web.AppKey[BlockingExecutor] = web.AppKey("ballast_executor")
UPSTREAM = web.AppKey("ballast_upstream", Upstream)
STATE = web.AppKey("ballast_state", dict[str, Any])
MAX_BODY = web.AppKey("ballast_max_body", int)
TELEMETRY = web.AppKey("ballast_telemetry", Telemetry)

#: The tenant every session belongs to when no authentication plugin names one.
DEFAULT_TENANT = "default"

#: Request-scoped: the request id (set by the outermost middleware).
REQUEST_ID = web.RequestKey("ballast_request_id", str)
#: Request-scoped: the caller's tenant, set by an authentication plugin (absent: the
#: default tenant). Read it with :func:`tenant_of`.
TENANT = web.RequestKey("ballast_tenant", str)
#: Request-scoped: extra fields for the canonical ``http.request`` line, set by a plugin
#: (the tracing plugin puts ``trace_id`` and ``span_id`` here).
LOG_FIELDS = web.RequestKey("ballast_log_fields", dict[str, str])


def tenant_of(request: web.Request) -> str:
    """The tenant a request acts for; :data:`DEFAULT_TENANT` when none was set."""
    tenant = request.get(TENANT)
    return tenant if isinstance(tenant, str) else DEFAULT_TENANT
