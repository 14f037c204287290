"""Every hook a Ballast plugin can implement.

Hooks are called while the application is built (or on rare paths such as a failed
mutation), never per request on the success path: they return middlewares, wrappers and
resources that the framework composes once into plain chains of async callables.
pluggy is synchronous; a hook that needs async work returns a callable or awaitable
that the framework awaits.

Hook names read as ``ballast_`` + phase + noun. Unless a docstring says "first non-None
result wins", every implementation's result is collected.

Build hooks that return something for the request or upstream path also receive
``telemetry`` (:class:`ballast.telemetry.Telemetry`): take instruments from it once,
inside the hook, and record on them per call (a plugin may omit the argument).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web
    from pydantic import BaseModel

    from ballast.config import Config
    from ballast.executor import BlockingExecutor
    from ballast.inference import InferenceWrapper, RunBlocking
    from ballast.jobs import StageWrapper
    from ballast.middleware import MiddlewareSpec
    from ballast.resilience import UpstreamRegistry
    from ballast.telemetry import Telemetry
    from ballast.upstream import AttemptWrapperSpec, ClientProvider, UpstreamCall, UpstreamWrapper

hookspec = pluggy.HookspecMarker("ballast")
hookimpl = pluggy.HookimplMarker("ballast")


# --------------------------------------------------------------------------------------
# configure
# --------------------------------------------------------------------------------------


@hookspec
def ballast_settings_model() -> type[BaseModel]:
    """The pydantic model of this plugin's ``[plugins.<name>]`` section.

    Called once per plugin while the config is validated, with each implementation
    called on its own so its result is tied to its plugin. The model must subclass
    :class:`ballast.config.PluginSection` (which brings ``enabled``). A plugin without
    this hook accepts only ``enabled``.
    """


@hookspec
def ballast_configure(config: Config) -> None:
    """After every plugin is registered and the config validated; check cross-settings.

    :param config: the validated config; ``config.plugin(name)`` is a plugin's section.
    Raise :class:`ballast.errors.ConfigError` to refuse a bad combination. Returns
    nothing.
    """


# --------------------------------------------------------------------------------------
# app build: request path
# --------------------------------------------------------------------------------------


@hookspec
def ballast_middlewares(config: Config, telemetry: Telemetry) -> list[MiddlewareSpec]:
    """Middlewares for the request path, called once when the app is built.

    :return: a list of :class:`ballast.middleware.MiddlewareSpec` (name, order,
        middleware). All results are merged and sorted by ``order``: the lowest order is
        the outermost. Builtin orders: ``error_sanitizer`` 100, ``timeout_budget`` 200.
    """


# --------------------------------------------------------------------------------------
# app build: outbound upstream path
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ballast_client_provider(config: Config, telemetry: Telemetry) -> ClientProvider | None:
    """The provider of outbound ``aiohttp.ClientSession`` s, called once at app build.

    First non-None result wins; the core falls back to a fresh session per call.
    The framework closes the provider on shutdown.
    """


@hookspec(firstresult=True)
def ballast_upstream_call(config: Config, provider: ClientProvider, telemetry: Telemetry,
                          attempt: UpstreamCall, upstreams: UpstreamRegistry) -> UpstreamCall | None:
    """The call that sends one logical upstream request, called once at app build.

    :param provider: the client provider chosen by :func:`ballast_client_provider`.
    :param attempt: the attempt pipeline (attempt wrappers around one send): call it
        once per try. It raises :class:`ballast.resilience.UpstreamRefused` for an
        attempt refused before it was sent (never retry that one) and
        :class:`ballast.upstream.AttemptError` (``retryable`` says if another try may
        help) for a failed one; any status comes back as a response.
    :param upstreams: the app's registry of shared per-upstream state.
    :return: ``async (UpstreamRequest) -> UpstreamResponse``. First non-None result
        wins; the core falls back to a single attempt with no retry.
    """


@hookspec
def ballast_upstream_attempt_wrappers(config: Config, telemetry: Telemetry,
                                      upstreams: UpstreamRegistry) -> list[AttemptWrapperSpec]:
    """Wrappers around each single attempt (inside the retry loop), called once at build.

    An attempt wrapper is ``(attempt) -> attempt`` with ``attempt`` being
    ``async (UpstreamRequest) -> UpstreamResponse``; ``request.attempt`` is the try's
    number and ``upstreams.for_url(request.upstream, request.url)`` its upstream's
    shared state. It may refuse an attempt before it is sent by raising
    :class:`ballast.resilience.UpstreamRefused` (not retried; 503 + ``Retry-After``),
    observe the outcome (a response of any status, or an ``UpstreamError``), or time
    it (a span per attempt). It must re-raise what it does not handle.

    :return: a list of :class:`ballast.upstream.AttemptWrapperSpec` (name, order,
        wrap). All plugins' specs are sorted by ``order``, lowest outermost. Builtin
        orders: ``circuit_breaker`` 100, the ``retry`` plugin's cooldown 200; the send
        (per-attempt timeout, no redirects, capped body) is always innermost.
    """


@hookspec
def ballast_upstream_wrappers(config: Config, telemetry: Telemetry) -> list[UpstreamWrapper]:
    """Wrappers around the whole logical upstream call (outside retry), called once at build.

    :return: a list of ``(UpstreamCall) -> UpstreamCall``. Results of all plugins are
        applied in registration order, the first one outermost.
    """


@hookspec
def ballast_inference_wrappers(config: Config, telemetry: Telemetry,
                               run_blocking: RunBlocking) -> list[InferenceWrapper]:
    """Wrappers around the inference provider (resolve and report), called once at build.

    A wrapper is ``(provider) -> provider`` over
    :class:`ballast.inference.InferenceProvider`: it sees each operation's
    input and its reply or error, and may answer otherwise (the ``fallback`` plugin
    answers with the builtin provider, marking the reply degraded with
    :func:`ballast.inference.mark_degraded`).

    :param run_blocking: runs blocking work on the app's executor (what the builtin
        provider needs).
    :return: a list of wrappers, applied in registration order, the first outermost.
    """


# --------------------------------------------------------------------------------------
# app build: blocking work and background jobs
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ballast_executor(config: Config, telemetry: Telemetry) -> BlockingExecutor | None:
    """The executor for blocking work (SQLite reads, CPU-heavy finalize stages).

    Called once at app build. First non-None result wins; the core falls back to an
    unbounded hand-off to the event loop's default thread pool. The framework starts
    and shuts it down with the app.
    """


@hookspec
def ballast_finalize_wrappers(config: Config, telemetry: Telemetry) -> list[StageWrapper]:
    """Wrappers around a finalize job's run, called once at app build.

    A wrapper is ``(run) -> run`` where ``run`` is ``async (job: JobContext) -> None``
    (:mod:`ballast.jobs`, the job contract); it may set ``job.deadline``, read
    ``job.current`` (the stage running), or cancel the run. It wraps the stages that
    decide the job's outcome; storing that outcome (``persist``) happens after the
    wrapped run returns and is not cut short. Applied in registration order, the first
    one outermost.
    """


# --------------------------------------------------------------------------------------
# runtime notifications (rare paths only)
# --------------------------------------------------------------------------------------


@hookspec
def ballast_mutation_failed(config: Config, session_id: str, mutations: list[dict[str, Any]],
                            error: BaseException) -> None:
    """A batch of mutations failed to apply; the session queue goes on.

    Called on the event loop, once per failed batch, after the failure is known and
    before the caller is answered. Must not block or raise (an exception raised here is
    logged and swallowed).

    Each implementation is called on its own, so one that raises does not keep the
    others from being told.

    :param config: the validated config (``config.plugin(name)`` for settings).
    :param session_id: the session whose batch failed.
    :param mutations: the batch as validated dicts (``id``, ``type``, fields).
    :param error: the exception; its text is for server-side logs only.
    """


# --------------------------------------------------------------------------------------
# shutdown
# --------------------------------------------------------------------------------------


@hookspec
def ballast_app_built(app: web.Application, config: Config) -> Callable[[], Any] | None:
    """After the app is fully built; a plugin may add routes or cleanup contexts.

    :return: optionally an async generator function ``(app) -> AsyncIterator[None]`` to
        append to ``app.cleanup_ctx`` (set-up before ``yield``, teardown after).
    """
