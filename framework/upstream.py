"""The outbound HTTP path to inference upstreams, as a pipeline composed once at build.

The order is Polly's standard HTTP pipeline, outermost first::

    Upstream.request                       counts the logical call (calls_total)
      logical-call wrappers                ballast_upstream_wrappers (total budget, ...)
        the upstream call                  ballast_upstream_call (retry), else one attempt
          attempt wrappers, by order       ballast_upstream_attempt_wrappers
                                           (circuit breaker 100, cooldown 200, ...)
            send                           one attempt: per-attempt timeout, no
                                           redirects, capped body (attempts_total)

Parts, each replaceable:

* a :class:`ClientProvider` hands out the ``aiohttp.ClientSession`` to send with (the
  ``shared_client`` plugin provides one shared, lazily created session; without it each
  attempt gets a short-lived session of its own);
* the *attempt* (:data:`Attempt`): one try, sent once. Attempt wrappers
  (:class:`AttemptWrapperSpec`) sit around the send and may refuse an attempt before
  it is sent by raising :class:`~ballast.resilience.UpstreamRefused`;
* the *upstream call* (:data:`UpstreamCall`): one logical request. The core's default
  is exactly one attempt; the ``retry`` plugin supplies one that calls the attempt
  again;
* logical-call wrappers (:data:`UpstreamWrapper`) around that call, outermost first.

Shared per-upstream state (breaker, budget, cooldown) lives in the app's
:class:`~ballast.resilience.UpstreamRegistry`, handed to the build hooks.

Every attempt's timeout is the smaller of the configured per-attempt timeout and the
time left in the current budget (:mod:`ballast.budget`), and covers reading the body.
Redirects are never followed: a 3xx would send the prompt to whatever host
``Location`` names, so it is an upstream error (``kind="redirect"``). A body larger
than ``max_response_bytes`` is never buffered: the attempt fails with
``kind="too_large"`` as soon as the cap is passed (or at once when
``Content-Length`` says so). Neither is retried.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from ballast import budget
from ballast.errors import UpstreamError
from ballast.logging import get_logger
from ballast.resilience import UpstreamRefused, UpstreamRegistry, UpstreamState
from ballast.telemetry import Reason, Telemetry

if TYPE_CHECKING:
    from ballast.config import Config

log = get_logger("ballast.upstream")

#: Default cap on an upstream response body (``inference.max_response_bytes``).
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: How much of an error response's body is read (then dropped): none of it is used.
ERROR_BODY_BYTES = 64 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One logical outbound request.

    ``name`` is a stable label of the operation for logs (``inference.resolve``);
    ``upstream`` the public name of the upstream (the provider, ``openai``): with the
    URL's host it keys the shared state, and it is the ``upstream`` label of metrics.
    Neither holds a host. ``attempt`` is set by the upstream call for each try (1-based).
    """

    method: str
    url: str
    name: str = "upstream"
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    attempt_timeout_s: float = 30.0
    upstream: str = "upstream"
    attempt: int = 1
    max_response_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A fully read response: the body is read inside the attempt's timeout."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 1


UpstreamCall = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]
UpstreamWrapper = Callable[[UpstreamCall], UpstreamCall]
#: One attempt: the same shape as a call, but sent at most once.
Attempt = UpstreamCall
AttemptWrapper = Callable[[Attempt], Attempt]


@dataclass(frozen=True, slots=True)
class AttemptWrapperSpec:
    """An attempt wrapper with its place: ``order`` lower is outer.

    Builtin orders: ``circuit_breaker`` 100, the ``retry`` plugin's cooldown 200. A
    wrapper placed outside 100 sees refused attempts too; inside 200 (say 900), only
    attempts that are really sent (the place for a client span per attempt).
    """

    name: str
    order: int
    wrap: AttemptWrapper


class ClientProvider(Protocol):
    """Hands out the client session to send with; closed once on shutdown."""

    async def session(self) -> aiohttp.ClientSession: ...

    @property
    def owns_sessions(self) -> bool:
        """True when each session handed out must be closed by the caller after use."""
        ...

    async def close(self) -> None: ...


class PerCallClientProvider:
    """The fallback without a shared client: a fresh session per attempt, closed after it.

    Safe under concurrency, but pays a connection set-up per attempt.
    """

    owns_sessions = True

    async def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def close(self) -> None:
        return None


class AttemptError(UpstreamError):
    """One attempt failed; ``retryable`` says whether another attempt may fare better."""

    def __init__(self, public_detail: str | None = None, *, retryable: bool, **kw: Any) -> None:
        super().__init__(public_detail, **kw)
        self.retryable = retryable


def attempt_timeout(request: UpstreamRequest) -> aiohttp.ClientTimeout:
    """The timeout for one attempt: per-attempt limit, cut to the budget left."""
    total = budget.bounded(request.attempt_timeout_s)
    if total is not None and total <= 0:
        raise UpstreamError(kind=Reason.BUDGET, attempts=0,
                            internal=f"{request.name}: no time budget left for an attempt")
    # aiohttp rounds timeouts of 5 s and more up to a whole second of loop time, which
    # could run an attempt past the budget: never round.
    return aiohttp.ClientTimeout(total=total, ceil_threshold=math.inf)


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, request: UpstreamRequest) -> bytes:
    """The body, or ``too_large`` as soon as it passes ``limit`` bytes (never buffered past it)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise AttemptError(kind=Reason.TOO_LARGE, retryable=False, upstream_status=resp.status,
                           internal=f"{request.name}: response of {resp.content_length} bytes "
                                    f"declared, over the {limit}-byte cap")
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise AttemptError(kind=Reason.TOO_LARGE, retryable=False, upstream_status=resp.status,
                               internal=f"{request.name}: response passed the {limit}-byte cap")
    return bytes(buf)


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of an error body; the rest is dropped with the connection."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        buf += chunk[: limit - len(buf)]
        if len(buf) >= limit:
            break
    return bytes(buf)


async def send_once(session: aiohttp.ClientSession, request: UpstreamRequest, *,
                    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> UpstreamResponse:
    """One attempt: send, read the body within the attempt timeout, classify errors.

    Raises :class:`AttemptError` (``timeout``, ``connection``: retryable;
    ``redirect``, ``too_large`` and TLS failures: not) or, with no time left,
    ``UpstreamError(kind="budget", attempts=0)`` before anything is sent.
    """
    timeout = attempt_timeout(request)
    limit = min(max_response_bytes, request.max_response_bytes or max_response_bytes)
    try:
        async with session.request(request.method, request.url, json=request.json,
                                   headers=dict(request.headers), timeout=timeout,
                                   allow_redirects=False) as resp:
            if 300 <= resp.status < 400:
                # Location is never read, logged or followed: it names another host.
                raise AttemptError(kind=Reason.REDIRECT, retryable=False, upstream_status=resp.status,
                                   internal=f"{request.name}: upstream answered a redirect "
                                            f"({resp.status}); redirects are not followed")
            if resp.status >= 400:
                body = await _read_prefix(resp, min(limit, ERROR_BODY_BYTES))
            else:
                body = await _read_capped(resp, limit, request)
            return UpstreamResponse(resp.status, dict(resp.headers), body)
    except TimeoutError as exc:
        raise AttemptError(kind=Reason.TIMEOUT, retryable=True,
                           internal=f"{request.name}: attempt timed out") from exc
    except aiohttp.ClientSSLError as exc:  # does not heal by trying again
        raise AttemptError(kind=Reason.CONNECTION, retryable=False,
                           internal=f"{request.name}: {type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise AttemptError(kind=Reason.CONNECTION, retryable=True,
                           internal=f"{request.name}: {type(exc).__name__}: {exc}") from exc


def attempt_outcome(response: UpstreamResponse | None, error: BaseException | None) -> str:
    """The ``outcome`` label of an attempt or call: ``ok`` for 2xx, else a reason code."""
    if error is not None:
        return str(getattr(error, "kind", Reason.CONNECTION))
    if response is not None and 200 <= response.status < 300:
        return "ok"
    return str(Reason.STATUS)


def send_attempt(provider: ClientProvider, telemetry: Telemetry | None = None, *,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Attempt:
    """The innermost attempt: one send with the provider's session, counted when sent."""
    attempts = (telemetry or Telemetry()).counter("ballast_upstream_attempts_total")

    async def attempt(request: UpstreamRequest) -> UpstreamResponse:
        session = await provider.session()
        response: UpstreamResponse | None = None
        outcome = str(Reason.BUDGET)  # cancelled mid-attempt: the caller's budget ended it
        try:
            response = await send_once(session, request, max_response_bytes=max_response_bytes)
            outcome = attempt_outcome(response, None)
            return response
        except UpstreamError as exc:
            # attempts == 0: refused before anything was sent, so not an attempt at all.
            outcome = "" if exc.attempts == 0 else attempt_outcome(None, exc)
            raise
        finally:
            if provider.owns_sessions:
                await session.close()
            if outcome:
                attempts.inc(request.upstream, outcome)

    return attempt


def single_attempt_call(attempt_or_provider: Attempt | ClientProvider) -> UpstreamCall:
    """The core's default upstream call: exactly one attempt, no retry.

    Its failures are logged as ``upstream.failed`` (a redirect with its status, never
    its ``Location``), as the ``retry`` plugin logs its own.
    """
    attempt: Attempt = (attempt_or_provider if callable(attempt_or_provider)
                        else send_attempt(attempt_or_provider))

    async def call(request: UpstreamRequest) -> UpstreamResponse:
        try:
            response = await attempt(request)
        except UpstreamRefused as refused:
            log_refused(request, refused)
            raise
        except UpstreamError as exc:
            log.error("upstream.failed", name=request.name, upstream=request.upstream,
                      attempts=exc.attempts if exc.attempts == 0 else 1, kind=exc.kind,
                      status=exc.upstream_status, error_type=_cause_type(exc))
            raise
        return UpstreamResponse(response.status, response.headers, response.body, attempts=1)

    return call


def log_refused(request: UpstreamRequest, refused: UpstreamRefused) -> None:
    """``upstream.refused``: a call answered by a local refusal, nothing sent upstream."""
    log.warning("upstream.refused", name=request.name, upstream=request.upstream, kind=refused.kind,
                retry_after_s=round(refused.retry_after_s, 3))


def _cause_type(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return None if cause is None else type(cause).__name__


def compose(call: UpstreamCall, wrappers: list[UpstreamWrapper]) -> UpstreamCall:
    """Apply wrappers so that ``wrappers[0]`` is the outermost."""
    for wrap in reversed(wrappers):
        call = wrap(call)
    return call


def compose_attempt(attempt: Attempt, specs: list[AttemptWrapperSpec]) -> Attempt:
    """Apply attempt wrappers by ``order``, lowest outermost (ties: registration order)."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"attempt wrapper name used twice: {', '.join(dupes)}")
    return compose(attempt, [s.wrap for s in sorted(specs, key=lambda s: s.order)])


class Upstream:
    """What the rest of the app holds: the composed call, its provider and shared state."""

    def __init__(self, call: UpstreamCall, provider: ClientProvider,
                 registry: UpstreamRegistry | None = None, telemetry: Telemetry | None = None) -> None:
        self.call = call
        self.provider = provider
        self.registry = registry if registry is not None else UpstreamRegistry()
        self._calls = (telemetry or Telemetry()).counter("ballast_upstream_calls_total")

    async def request(self, request: UpstreamRequest) -> UpstreamResponse:
        outcome = str(Reason.BUDGET)  # cancelled: the caller's budget ended it
        try:
            response = await self.call(request)
            outcome = attempt_outcome(response, None)
            return response
        except UpstreamError as exc:
            outcome = attempt_outcome(None, exc)
            raise
        finally:
            self._calls.inc(request.upstream, outcome)

    def state(self, request: UpstreamRequest) -> UpstreamState:
        """The shared state of the upstream ``request`` goes to."""
        return self.registry.for_url(request.upstream, request.url)

    async def close(self) -> None:
        await self.provider.close()


def build_upstream(hook: Any, config: Config, telemetry: Telemetry,
                   provider: ClientProvider | None = None) -> Upstream:
    """Compose the whole outbound pipeline from the plugins' hooks (called once, at build)."""
    provider = provider or hook.ballast_client_provider(config=config, telemetry=telemetry) \
        or PerCallClientProvider()
    registry = UpstreamRegistry()
    cap = config.settings.inference.max_response_bytes
    specs = [s for group in reversed(hook.ballast_upstream_attempt_wrappers(
        config=config, telemetry=telemetry, upstreams=registry)) for s in group]
    attempt = compose_attempt(send_attempt(provider, telemetry, max_response_bytes=cap), specs)
    call = hook.ballast_upstream_call(config=config, provider=provider, telemetry=telemetry,
                                      attempt=attempt, upstreams=registry) \
        or single_attempt_call(attempt)
    wrappers = [w for group in reversed(hook.ballast_upstream_wrappers(
        config=config, telemetry=telemetry)) for w in group]
    return Upstream(compose(call, wrappers), provider, registry, telemetry)


def response_error(request: UpstreamRequest, response: UpstreamResponse) -> UpstreamError:
    """The typed error for a final non-2xx response."""
    return UpstreamError(kind=Reason.STATUS, upstream_status=response.status, attempts=response.attempts,
                         internal=f"{request.name}: upstream answered {response.status}")


__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "Attempt",
    "AttemptError",
    "AttemptWrapper",
    "AttemptWrapperSpec",
    "ClientProvider",
    "PerCallClientProvider",
    "Upstream",
    "UpstreamCall",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamWrapper",
    "attempt_outcome",
    "attempt_timeout",
    "build_upstream",
    "compose",
    "compose_attempt",
    "log_refused",
    "response_error",
    "send_attempt",
    "send_once",
    "single_attempt_call",
]
