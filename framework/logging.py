"""Structured logging: one JSON object per line on stdout, and the canonical request line.

structlog is set up with its fast production chain (contextvars, level, ISO UTC time,
orjson) unless ``[logging] format = "console"``. Every value passes a redaction step:
keys that name secrets are masked, and the literal values of registered secrets (the
API key) are scrubbed from any string, so a secret cannot reach a log line even inside
an exception message. Anything shaped like a credential is scrubbed too, whoever sent it:
``Bearer <token>`` (an Authorization value quoted in an error) and Ballast API keys
(``bk_...``, which a confused client might put in a URL).

The canonical ``http.request`` line is written once per request on a fast path that
builds the JSON object directly (same fields and format as structlog's chain): at the
rates the service runs, the generic processor chain on every request costs more than the
handler itself.
"""

from __future__ import annotations

import logging as std_logging
import re
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

_SECRET_KEYS = ("authorization", "api_key", "apikey", "secret", "password", "token", "cookie")
_secrets: set[str] = set()
#: Credentials recognised by their shape: a bearer token, a Ballast API key (``bk_``).
_CREDENTIAL = re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;]+|\bbk_[A-Za-z0-9_-]{8,}")
_level_no = std_logging.INFO
_json_fast_path = True

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def register_secret(value: str | None) -> None:
    """Scrub this literal value from every log line from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _scrub_credentials(text: str) -> str:
    if "bk_" in text or "earer" in text or "EARER" in text:
        return _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}***" if m.group(1) else "***", text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for s in _secrets:
            if s in value:
                value = value.replace(s, "***")
        return _scrub_credentials(value)
    if isinstance(value, dict):
        return {k: ("***" if _is_secret_key(k) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _is_secret_key(key: Any) -> bool:
    k = str(key).lower()
    return any(m in k for m in _SECRET_KEYS) and not k.endswith("_env")


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named keys, scrub registered secret values."""
    for key, value in list(event_dict.items()):
        if _is_secret_key(key):
            event_dict[key] = "***"
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _scrub(value)
    return event_dict


_ts_second = -1
_ts_prefix = ""


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds and ``Z``, as structlog's TimeStamper writes it.

    The date and time of day are formatted once a second, not once a line: on the
    canonical line, building a datetime per request cost as much as the JSON encoding.
    """
    global _ts_second, _ts_prefix
    now = time.time()
    second = int(now)
    if second != _ts_second:
        _ts_prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _ts_second = second
    return f"{_ts_prefix}.{int((now - second) * 1_000_000):06d}Z"


def configure(fmt: str = "json", level: str = "info", *, cache: bool = True) -> None:
    """Set up structlog for the process; ``cache=False`` lets tests reconfigure."""
    global _level_no, _json_fast_path
    _level_no = LEVELS[level]
    _json_fast_path = fmt == "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        redact,
    ]
    if fmt == "console":
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [*shared, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_no),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()


#: Fields every canonical request line of this process carries (a worker's index).
_process_fields: dict[str, Any] = {}


def bind_process_fields(**fields: Any) -> None:
    """Add ``fields`` to every log line this process writes from now on."""
    _process_fields.update(fields)
    structlog.contextvars.bind_contextvars(**fields)


def request_line(method: str, route: str, path: str, status: int, duration_ms: float,
                 request_id: str, **extra: Any) -> None:
    """Emit the canonical ``http.request`` line (the fast path in JSON mode)."""
    if _level_no > LEVELS["info"]:
        return
    if not _json_fast_path or structlog.is_configured() is False:
        get_logger().info("http.request", method=method, route=route, path=path, status=status,
                          duration_ms=duration_ms, request_id=request_id, **extra)
        return
    line = {
        "timestamp": _timestamp(), "level": "info", "event": "http.request",
        "request_id": request_id, "method": method, "route": route, "path": path,
        "status": status, "duration_ms": duration_ms,
    }
    if extra:
        line.update(extra)
    if _process_fields:
        line.update(_process_fields)
    if _secrets or "bk_" in path:
        line = _scrub(line)
    sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
    sys.stdout.buffer.flush()


def monotonic_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


__all__ = ["bind_process_fields", "configure", "get_logger", "monotonic_ms", "redact",
           "register_secret", "request_line"]
