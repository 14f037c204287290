"""Secret scrubbing in log lines: registered secrets, secret-named fields, and anything
shaped like a credential (``Bearer ...``, a ``bk_`` API key), on every path a line takes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from ballast import logging as blog

API_KEY = "bk_" + "Q7x-9_" * 7 + "z"


@pytest.fixture
def json_logs(capsysbinary: pytest.CaptureFixture[bytes]) -> Iterator[pytest.CaptureFixture[bytes]]:
    blog.configure("json", "info", cache=False)
    yield capsysbinary
    structlog.reset_defaults()


def _lines(capture: pytest.CaptureFixture[bytes]) -> list[dict[str, object]]:
    out = capture.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_credentials_are_scrubbed_from_any_field_of_a_structlog_line() -> None:
    """The ``redact`` processor of the structlog chain, on an error line's fields."""
    event = blog.redact(None, "error", {
        "event": "error.unhandled", "error": f"bad header 'Authorization: Bearer {API_KEY}'",
        "traceback": f"Traceback ...\nValueError: key {API_KEY} rejected",
        "headers": {"Authorization": f"Bearer {API_KEY}", "X-Other": f"see {API_KEY}"},
        "items": [f"Bearer {API_KEY}"], "authorization": f"Bearer {API_KEY}"})
    text = json.dumps(dict(event))
    assert API_KEY not in text and API_KEY[3:] not in text
    assert "Bearer ***" in text


def test_the_request_line_scrubs_a_key_in_the_path(json_logs: pytest.CaptureFixture[bytes]) -> None:
    blog.request_line("GET", "/v1/sessions/{session_id}", f"/v1/sessions/{API_KEY}", 404, 1.0,
                      "rid-12345678", session_id=API_KEY)
    lines = _lines(json_logs)
    assert len(lines) == 1 and lines[0]["status"] == 404
    assert API_KEY not in json.dumps(lines)
    assert lines[0]["path"] == "/v1/sessions/***"


@pytest.mark.parametrize(("text", "scrubbed"), [
    ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
    ("bearer\tXYZ", "bearer\t***"),
    (f"key={API_KEY};", "key=***;"),
    ("a bk_short word", "a bk_short word"),  # too short to be a key
    ("nothing to see", "nothing to see"),
])
def test_credential_shapes(text: str, scrubbed: str) -> None:
    assert blog._scrub(text) == scrubbed


def test_registered_secrets_are_still_scrubbed() -> None:
    blog.register_secret("sk-registered-0123456789")
    try:
        assert blog._scrub({"error": "upstream said sk-registered-0123456789"}) == {
            "error": "upstream said ***"}
    finally:
        blog._secrets.discard("sk-registered-0123456789")
