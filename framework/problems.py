"""RFC 9457 problem responses, and reading request bodies into validated models.

Every error response Ballast sends is built here, from public text only.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from ballast.errors import BallastError, ClientError, ValidationFailed
from ballast.keys import MAX_BODY

PROBLEM_CONTENT_TYPE = "application/problem+json"
M = TypeVar("M", bound=BaseModel)

#: Generic, stable text per status for errors that carry no public text of their own.
GENERIC: dict[int, tuple[str, str]] = {
    400: ("Bad request", "The request could not be understood."),
    401: ("Unauthorized", "Authentication is required."),
    403: ("Forbidden", "The request is not allowed."),
    404: ("Not found", "The requested resource does not exist."),
    405: ("Method not allowed", "The method is not allowed on this resource."),
    406: ("Not acceptable", "The requested representation is not available."),
    408: ("Request timeout", "The request took too long to arrive."),
    409: ("Conflict", "The request conflicts with the current state of the resource."),
    413: ("Payload too large", "The request body is larger than the server accepts."),
    415: ("Unsupported media type", "Send the body as uncompressed application/json."),
    422: ("Validation failed", "The request body does not match the schema."),
    429: ("Too many requests", "Slow down and retry later."),
    500: ("Internal server error", "The server could not complete the request."),
    502: ("Bad gateway", "A dependency of this service is temporarily unavailable."),
    503: ("Service unavailable", "The service is temporarily unavailable; retry later."),
    504: ("Gateway timeout", "The request did not complete within its time budget."),
}


def generic(status: int) -> tuple[str, str]:
    if status in GENERIC:
        return GENERIC[status]
    return GENERIC[500] if status >= 500 else GENERIC[400]


def problem_response(status: int, title: str, detail: str, request_id: str,
                     *, headers: dict[str, str] | None = None,
                     extra: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail, "request_id": request_id}
    if extra:
        body.update(extra)
    resp = web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                        headers=headers)
    return resp


def error_response(exc: BallastError, request_id: str) -> web.Response:
    body = exc.problem()
    return problem_response(exc.status, body.pop("title"), body.pop("detail"), request_id,
                            headers=exc.headers, extra={k: v for k, v in body.items()
                                                        if k not in ("type", "status")})


def generic_response(status: int, request_id: str, headers: dict[str, str] | None = None) -> web.Response:
    title, detail = generic(status)
    return problem_response(status, title, detail, request_id, headers=headers)


def is_problem(resp: web.StreamResponse) -> bool:
    return resp.content_type == PROBLEM_CONTENT_TYPE


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        out.append({"field": loc or "(body)", "message": err["msg"]})
    return out[:50]


def _too_large(limit: int | None) -> ClientError:
    return ClientError(f"The request body exceeds the limit of {limit} bytes.",
                       status=413, title="Payload too large")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 4xx problem that says what is wrong with it."""
    ctype = request.content_type
    if request.body_exists and ctype not in ("application/json", "application/problem+json") \
            and not ctype.endswith("+json"):
        raise ClientError(f"Content-Type must be application/json, not {ctype[:60]!r}.",
                          status=415, title="Unsupported media type")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The server never inflates request bodies (a few MB of gzip can inflate to
        # gigabytes); the body is refused before a byte of it is read.
        raise ClientError("Compressed request bodies are not accepted; send the JSON body "
                          "without Content-Encoding.", status=415, title="Unsupported media type")
    limit = request.app.get(MAX_BODY)
    if limit is not None and request.content_length is not None and request.content_length > limit:
        # Refused on the declared length, before waiting for a body that will be refused.
        raise _too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except ConnectionResetError:
        # The client went away mid-body: its mistake (or its network's), not a server error.
        raise ClientError("The request body ended before it was complete.",
                          title="Incomplete body") from None
    except (web.RequestPayloadError, HttpProcessingError):
        # The body's framing is broken (a bad chunk, a length it does not keep).
        raise ClientError("The request body could not be decoded.", title="Undecodable body") from None
    if not raw:
        raise ClientError("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position; it describes the client's own bytes.
        reason = exc.args[0] if exc.args else "invalid"
        raise ClientError(f"The request body is not valid JSON: {reason}.", title="Malformed JSON") from None


async def read_model(request: web.Request, model: type[M]) -> M:
    data = await read_json(request)
    return validate(model, data)


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = _field_errors(exc)
        first = errors[0] if errors else {"field": "(body)", "message": "invalid"}
        raise ValidationFailed(f"{first['field']}: {first['message']}"
                               + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                               extra={"errors": errors}) from None
