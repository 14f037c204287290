"""Typed errors: each carries an internal detail for the logs and a public message for clients.

Code that raises a :class:`BallastError` decides, at the raise site, what a client may
see (``title``/``public_detail``) and what only the server log may see (``internal``).
The request path turns these into RFC 9457 problem responses; nothing else about the
exception ever reaches a client.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BallastError(Exception):
    """Base of every error that Ballast maps to a problem response.

    ``internal`` is free text for the server log (may hold upstream hosts, SQL, ...);
    ``public_detail`` is what the client reads and must never hold internal detail.
    """

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"
    type_uri: ClassVar[str] = "about:blank"
    default_detail: ClassVar[str] = "The server could not complete the request."

    def __init__(
        self,
        public_detail: str | None = None,
        *,
        internal: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.public_detail = public_detail or self.default_detail
        self.internal = internal or self.public_detail
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(self.internal)

    def problem(self) -> dict[str, Any]:
        """The public problem body (without ``request_id``, added by the request path)."""
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.public_detail,
        }
        body.update(self.extra)
        return body


class ClientError(BallastError):
    """The client's own request is wrong; its detail explains what to change."""

    status = 400
    title = "Bad request"
    default_detail = "The request is not valid."

    def __init__(self, public_detail: str | None = None, *, status: int | None = None,
                 title: str | None = None, **kw: Any) -> None:
        super().__init__(public_detail, **kw)
        if status is not None:
            self.status = status  # type: ignore[misc]
        if title is not None:
            self.title = title  # type: ignore[misc]


class ValidationFailed(ClientError):
    status = 422
    title = "Validation failed"
    default_detail = "The request body does not match the schema."


class NotFound(ClientError):
    status = 404
    title = "Not found"
    default_detail = "The resource does not exist."


class Conflict(ClientError):
    status = 409
    title = "Conflict"
    default_detail = "The request conflicts with the current state of the resource."


class Overloaded(BallastError):
    """Capacity is exhausted; the client should retry after ``retry_after_s``."""

    status = 503
    title = "Service overloaded"
    default_detail = "The server is at capacity; retry after the time in Retry-After."

    def __init__(self, retry_after_s: int = 1, **kw: Any) -> None:
        kw.setdefault("headers", {})["Retry-After"] = str(max(1, int(retry_after_s)))
        super().__init__(**kw)
        self.retry_after_s = retry_after_s


class BudgetExceeded(BallastError):
    """A time budget ran out (a request, a finalize job, an upstream call)."""

    status = 504
    title = "Request timed out"
    default_detail = "The request did not complete within its time budget."


class UpstreamError(BallastError):
    """An outbound inference call failed for good (after any retries).

    ``kind`` is a stable, non-secret label for logs and metrics: ``status``,
    ``timeout``, ``connection``, ``malformed``, ``budget``.
    """

    status = 502
    title = "Upstream unavailable"
    default_detail = "A dependency of this service is temporarily unavailable."

    def __init__(self, public_detail: str | None = None, *, kind: str = "status",
                 upstream_status: int | None = None, attempts: int = 1, **kw: Any) -> None:
        super().__init__(public_detail, **kw)
        self.kind = kind
        self.upstream_status = upstream_status
        self.attempts = attempts


class StoreError(BallastError):
    """The store failed to apply or read something."""

    status = 500
    title = "Internal server error"
    default_detail = "The server could not complete the request."


class PluginError(Exception):
    """A plugin could not be loaded, configured or composed (start-up only)."""


class ConfigError(Exception):
    """Configuration is invalid; the message names the offending key."""
