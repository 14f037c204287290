"""docs/security.md states every connection and request limit with its true default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ballast.config import ServerSettings
from ballast.http_server import KEEPALIVE_TIMEOUT_S
from ballast.plugins.auth import Settings as AuthSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def _rows() -> dict[str, str]:
    rows = re.findall(r"^\| `([\w.]+)`(?: / `(\w+)`)? \| `([^`]+)`(?: / `([^`]+)`)?[^|]*\|", DOC.read_text(),
                      re.MULTILINE)
    out = {}
    for name, second, value, second_value in rows:
        out[name] = value
        if second:
            out[name.rsplit(".", 1)[0] + "." + second] = second_value
    return out


@pytest.mark.parametrize("key", ["header_timeout_s", "max_body_bytes", "shutdown_timeout_s"])
def test_server_limits_are_documented_with_their_defaults(key: str) -> None:
    shown = _rows()[f"server.{key}"]
    assert tomllib.loads(f"v = {shown}")["v"] == ServerSettings.model_fields[key].default


@pytest.mark.parametrize("key", ["rate_per_s", "burst"])
def test_auth_limits_are_documented_with_their_defaults(key: str) -> None:
    shown = _rows()[f"plugins.auth.{key}"]
    assert tomllib.loads(f"v = {shown}")["v"] == AuthSettings.model_fields[key].default


def test_the_rest_is_named() -> None:
    text = DOC.read_text()
    assert f"| idle keep-alive (fixed) | {KEEPALIVE_TIMEOUT_S:.0f} s |" in text
    for name in ("server.allow_unauthenticated", "protect_metrics", "inference.max_response_bytes",
                 "Content-Encoding", "reverse proxy"):
        assert name in text, name


@pytest.mark.parametrize("dotted", ["sessions.max_participants", "sessions.max_speaker_labels",
                                    "sessions.max_mutations", "inference.max_response_bytes"])
def test_session_and_upstream_limits_are_documented_with_their_defaults(dotted: str) -> None:
    from ballast.config import Settings

    section, key = dotted.split(".")
    model = type(getattr(Settings(), section))
    shown = _rows()[dotted]
    assert tomllib.loads(f"v = {shown}")["v"] == model.model_fields[key].default
