"""Tests of ballast-stamp: its parts on their own, then the installed plugin in a real server.

The server tests need the plugin installed (its entry point is how Ballast finds it)
and the ``ballast`` command on PATH or next to the Python running the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ballast_stamp
import pytest
from aiohttp import web
from pydantic import ValidationError

from ballast import UpstreamRequest, UpstreamResponse


def _ballast() -> list[str]:
    beside = Path(sys.executable).with_name("ballast")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ballast")
    assert found, "the ballast command is not installed"
    return [found]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


# --- the parts ---------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    settings = ballast_stamp.Settings()
    assert (settings.enabled, settings.header, settings.value, settings.upstream) == (
        True, "X-Served-By", "ballast", False)
    for bad in ({"header": "Two Words"}, {"value": "a\r\nSet-Cookie: x"}, {"colour": "red"}):
        with pytest.raises(ValidationError):
            ballast_stamp.Settings.model_validate(bad)


async def test_the_middleware_stamps_returned_and_raised_responses(aiohttp_client: Any) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application(middlewares=[web.middleware(
        ballast_stamp.stamp_middleware(header="X-Edge", value="e1"))])
    app.router.add_get("/ok", ok)
    app.router.add_get("/missing", missing)
    client = await aiohttp_client(app)
    for path, status in (("/ok", 200), ("/missing", 404)):
        resp = await client.get(path)
        assert (resp.status, resp.headers["X-Edge"]) == (status, "e1")


class _Shown(dict[str, str]):
    """Headers that hide a credential when printed, as Ballast's providers' do."""

    def __repr__(self) -> str:
        return "<hidden>"


async def test_the_upstream_wrapper_adds_the_header_and_keeps_the_mapping_type() -> None:
    seen: list[UpstreamRequest] = []

    async def send(request: UpstreamRequest) -> UpstreamResponse:
        seen.append(request)
        return UpstreamResponse(200, {}, b"{}")

    call = ballast_stamp.stamp_upstream(header="X-Edge", value="e1")(send)
    original = UpstreamRequest("POST", "http://upstream.invalid/v1", headers=_Shown(Authorization="x"))
    await call(original)
    [sent] = seen
    assert dict(sent.headers) == {"Authorization": "x", "X-Edge": "e1"}
    assert type(sent.headers) is _Shown and repr(sent.headers) == "<hidden>"
    assert dict(original.headers) == {"Authorization": "x"}  # the caller's request is untouched


# --- the installed plugin in a real server -----------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = _port()
    env = {**os.environ, "BALLAST__SERVER__HOST": "127.0.0.1", "BALLAST__SERVER__PORT": str(port),
           "BALLAST__STORAGE__PATH": str(tmp_path / "ballast.db"),
           "BALLAST__PLUGINS__STAMP__VALUE": "test-42"}
    proc = subprocess.Popen([*_ballast(), "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            try:
                if _get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_the_installed_plugin_is_listed() -> None:
    out = subprocess.run([*_ballast(), "plugins", "--json"], capture_output=True, text=True, check=True)
    [stamp] = [p for p in json.loads(out.stdout) if p["name"] == "stamp"]
    assert stamp["enabled"] is True
    assert stamp["source"] == "entry point ballast-stamp"
    assert stamp["settings"] == {"enabled": True, "header": "X-Served-By", "value": "ballast",
                                 "upstream": False}
    assert {"ballast_middlewares", "ballast_configure", "ballast_app_built"} <= set(stamp["hooks"])


def test_every_response_is_stamped_problems_included(server: str) -> None:
    status, headers, body = _get(server + "/healthz")
    assert (status, headers["X-Served-By"]) == (200, "test-42")
    status, headers, body = _get(server + "/v1/sessions/nobody")
    assert (status, headers["X-Served-By"]) == (404, "test-42")
    assert headers["Content-Type"].startswith("application/problem+json")
    status, _, body = _get(server + "/stamp")
    assert (status, body) == (200, {"header": "X-Served-By", "value": "test-42", "upstream": False})


def test_a_reserved_header_is_refused_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "BALLAST__PLUGINS__STAMP__HEADER": "X-Request-ID",
           "BALLAST__STORAGE__PATH": str(tmp_path / "ballast.db")}
    out = subprocess.run([*_ballast(), "config", "show"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "plugins.stamp.header" in out.stderr + out.stdout
