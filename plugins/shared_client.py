"""shared_client: one outbound ``aiohttp.ClientSession`` per app, instead of one per call.

A ``ClientSession`` owns a connection pool. Opening one per upstream call (the core's
fallback) pays a TCP (and TLS) set-up on every call and defeats keep-alive; creating
one per request under load can also exhaust sockets. This plugin hands every upstream
call the same session, with a bounded connector.

The session is created lazily, on first use and inside the running event loop (a
session made outside a loop is bound to the wrong one). First use is guarded by a
double-checked ``asyncio.Lock``, so any number of concurrent first calls create exactly
one session. If the session has been closed (by shutdown, or by a component that should
not have closed it) the next call creates a new one. The framework calls
:meth:`SharedClientProvider.close` on shutdown.

Disabled: each upstream attempt opens and closes a session of its own.
"""

from __future__ import annotations

import asyncio

import aiohttp
from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger

log = get_logger("ballast.shared_client")


class Settings(PluginSection):
    limit: int = Field(default=100, ge=1, le=100_000,
                       description="connections open at once in all, across hosts")
    limit_per_host: int = Field(default=20, ge=0, le=100_000,
                                description="connections open at once to one host (0: no limit)")
    keepalive_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                       description="seconds an idle pooled connection is kept open")
    dns_cache_ttl_s: int = Field(default=10, ge=0, le=86_400,
                                 description="seconds a DNS answer is cached (0: no DNS cache)")


class SharedClientProvider:
    """Hands out one lazily created ``ClientSession``; see the module docstring.

    The provider stays usable after :meth:`close`: a later :meth:`session` call creates
    a new session, which a later :meth:`close` closes.
    """

    #: Callers must not close the session they are given: it is shared.
    owns_sessions = False

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        #: How many sessions this provider has created (tests and diagnostics).
        self.created = 0
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> aiohttp.ClientSession | None:
        """The session in use, if one has been created and not closed."""
        session = self._session
        return session if session is not None and not session.closed else None

    async def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is not None and not session.closed:
            return session
        async with self._lock:
            # Checked again: another caller may have created it while this one waited.
            session = self._session
            if session is None or session.closed:
                session = await self._open()
                self._session = session
                self.created += 1
                log.debug("shared_client.created", sessions_created=self.created)
            return session

    async def _open(self) -> aiohttp.ClientSession:
        """Create the session; only ever called under the lock, inside the running loop."""
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.limit,
            limit_per_host=s.limit_per_host,
            keepalive_timeout=s.keepalive_timeout_s,
            use_dns_cache=s.dns_cache_ttl_s > 0,
            ttl_dns_cache=s.dns_cache_ttl_s or None,
        )
        # No session-wide timeout is set: every call passes its attempt's own timeout.
        return aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        async with self._lock:
            session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_client_provider(config: Config) -> SharedClientProvider:
    return SharedClientProvider(config.plugin("shared_client"))
