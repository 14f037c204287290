"""fallback: answer from the builtin provider when the inference upstream fails, and say so.

During an upstream outage, resolve answers 502/503 and finalize jobs fail at their
report stage. Some deployments prefer a weaker answer to none: the embedded ``builtin``
provider (speaker names from self-introductions, an extractive report) runs offline
and always answers. This plugin wraps the inference provider (hook
``ballast_inference_wrappers``): when resolve or report fails with any upstream error
(a failing status after retries, a timeout, a malformed reply, a refusal by the
circuit breaker or the cooldown), it asks the builtin provider instead.

A fallback answer is never passed off as the real thing: it is marked degraded
(:func:`ballast.inference.mark_degraded`), and the session service shows the
mark: the resolve response carries ``X-Ballast-Degraded: inference`` and
``"degraded": true``, the report ``"degraded": true`` (and the header when it is read).
Each use is logged as ``fallback.used`` (operation, kind) and counted in
``ballast_fallback_total``.

Off by default, so that an outage reads as one (resolve answers 502/503). With the
``builtin`` provider configured it changes nothing. If the builtin provider itself
fails, the original upstream error is raised.

Disabled: an inference failure fails the resolve request (502, or 503 + Retry-After
when refused locally) or the finalize job's report stage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.errors import UpstreamError
from ballast.hookspecs import hookimpl
from ballast.inference import (
    InferenceProvider,
    InferenceWrapper,
    ReportInput,
    ReportReply,
    ResolveInput,
    ResolveReply,
    RunBlocking,
    mark_degraded,
)
from ballast.logging import get_logger
from ballast.sessions.builtin import BuiltinProvider
from ballast.telemetry import Counter, Telemetry

log = get_logger("ballast.fallback")
_T = TypeVar("_T", ResolveReply, ReportReply)


class FallbackProvider:
    """``primary``'s answers, or ``fallback``'s (marked degraded) when ``primary`` fails."""

    def __init__(self, primary: InferenceProvider, fallback: InferenceProvider, counter: Counter) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = primary.name
        self._counter = counter

    async def resolve(self, data: ResolveInput) -> ResolveReply:
        return await self._ask("resolve", self.primary.resolve, self.fallback.resolve, data)

    async def report(self, data: ReportInput) -> ReportReply:
        return await self._ask("report", self.primary.report, self.fallback.report, data)

    async def _ask(self, operation: str, primary: Callable[..., Awaitable[_T]],
                   fallback: Callable[..., Awaitable[_T]], data: object) -> _T:
        try:
            return await primary(data)
        except UpstreamError as exc:
            failure = exc
        try:
            reply = await fallback(data)
        except Exception:
            log.error("fallback.failed", operation=operation, kind=failure.kind)
            raise failure from None
        log.warning("fallback.used", operation=operation, kind=failure.kind,
                    provider=self.primary.name, attempts=failure.attempts)
        self._counter.inc(operation, str(failure.kind))
        return mark_degraded(reply, str(failure.kind))

    async def close(self) -> None:
        try:
            await self.primary.close()
        finally:
            await self.fallback.close()


class Settings(PluginSection):
    enabled: bool = Field(default=False, description="off by default: an outage reads as one")


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_inference_wrappers(config: Config, telemetry: Telemetry,
                               run_blocking: RunBlocking) -> list[InferenceWrapper]:
    counter = telemetry.counter("ballast_fallback_total")

    def wrap(provider: InferenceProvider) -> InferenceProvider:
        if isinstance(provider, BuiltinProvider):
            return provider  # already the fallback: nothing to fall back to
        return FallbackProvider(provider, BuiltinProvider(run_blocking), counter)

    return [wrap]
