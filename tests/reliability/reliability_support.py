"""Shared helpers of the black-box reliability suite (tests/reliability).

Everything here talks to a real ``ballast serve`` process over loopback: nothing reaches
into the server's memory. The suite's scale is set by the ``BALLAST_HEAVY`` environment
variable: unset (or anything but ``1``), every test is sized to keep the whole folder
within about three minutes on two cores; ``BALLAST_HEAVY=1`` runs the longer variants
(more kills, more examples, a longer and wider flood).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import request, run_cli

#: True when the heavy variants were asked for (``BALLAST_HEAVY=1``).
HEAVY = os.environ.get("BALLAST_HEAVY", "") == "1"


def scale(default: int, heavy: int) -> int:
    """``heavy`` under ``BALLAST_HEAVY=1``, else ``default``."""
    return heavy if HEAVY else default


# ------------------------------------------------------------------------------ figures

#: Figures measured by the tests, printed in pytest's terminal summary (conftest.py).
FIGURES: list[tuple[str, list[str]]] = []


def report(title: str, lines: Iterable[str]) -> None:
    """Record figures for the summary, and print them (visible with ``-s``)."""
    rows = list(lines)
    FIGURES.append((title, rows))
    print(f"\n== {title}")
    for row in rows:
        print(f"   {row}")


# ------------------------------------------------------------------------------ server config

SECRET_API_KEY = "sk-ballast-reliability-7f3a9c2e51d84b06"
API_KEY_ENV = "BALLAST_RELIABILITY_API_KEY"


def openai_config(base_url: str, *, timeout_ms: int = 800, finalize_ms: int = 6000,
                  request_ms: int = 5000, extra: str = "") -> str:
    """TOML for a server using the openai provider against ``base_url``, fast retries."""
    return (
        "[inference]\n"
        'provider = "openai"\n'
        f'base_url = "{base_url}"\n'
        'model = "reliability-model"\n'
        f'api_key_env = "{API_KEY_ENV}"\n'
        f"timeout_ms = {timeout_ms}\n"
        "[plugins.retry]\n"
        "attempts = 3\n"
        "start_timeout_s = 0.05\n"
        "max_timeout_s = 0.2\n"
        "max_retry_after_s = 1\n"
        "[plugins.timeout_budget]\n"
        f"finalize_ms = {finalize_ms}\n"
        f"request_ms = {request_ms}\n" + extra
    )


def auth_on(workdir: Path, tenant: str = "reliability") -> tuple[str, dict[str, str]]:
    """Config enabling the ``auth`` plugin with one new write key, and that key's header.

    The key is made by the real ``ballast keys create``; the rate limit is set high so
    that the suite's own load is not what it measures.
    """
    keys_file = workdir / "keys.toml"
    result = run_cli("keys", "create", "--tenant", tenant, "--keys-file", str(keys_file), "--json")
    assert result.returncode == 0, result.stderr
    key = json.loads(result.stdout)["key"]
    config = (f'[plugins.auth]\nenabled = true\nkeys_file = "{keys_file}"\n'
              "rate_per_s = 100000.0\nburst = 100000\n")
    return config, {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------ HTTP helpers


@dataclass
class Exchange:
    """One request and what came back, kept for the leak scan."""

    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Client:
    """A blocking client of one server that remembers every exchange."""

    base_url: str
    seen: list[Exchange] = field(default_factory=list)
    #: Sent with every call (an ``Authorization`` header when the server has auth on).
    headers: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
        status, hdrs, parsed = request(method, self.base_url + path, body,
                                       headers={**self.headers, **(headers or {})}, raw=raw,
                                       timeout=timeout)
        self.seen.append(Exchange(method, path, status, hdrs, parsed))
        return status, hdrs, parsed

    def session(self, sid: str) -> dict[str, Any]:
        status, _, body = self.call("GET", f"/v1/sessions/{sid}")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    def poll_job(self, sid: str, within: float = 30.0) -> dict[str, Any]:
        """Poll ``GET .../finalize`` until the job leaves ``running``."""
        deadline = time.monotonic() + within
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, _, body = self.call("GET", f"/v1/sessions/{sid}/finalize")
            assert status == 200, body
            job = body["job"]
            if job["state"] != "running":
                return job
            time.sleep(0.05)
        raise AssertionError(f"finalize job of {sid} still running after {within}s: {job}")

    def all_mutations(self, sid: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        after = 0
        while True:
            status, _, page = self.call("GET", f"/v1/sessions/{sid}/mutations?after={after}&limit=1000")
            assert status == 200, page
            rows.extend(page["mutations"])
            if page["next_after"] is None:
                return rows
            after = page["next_after"]


def header(headers: Mapping[str, str], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def assert_problem(status: int, headers: Mapping[str, str], body: Any, *,
                   statuses: Iterable[int] | None = None) -> None:
    """An RFC 9457 problem whose request_id matches the X-Request-ID header."""
    allowed = set(statuses) if statuses is not None else set(range(400, 500))
    assert status in allowed, (status, body)
    ctype = header(headers, "Content-Type") or ""
    assert ctype.startswith("application/problem+json"), (status, ctype, body)
    assert isinstance(body, dict), body
    assert {"type", "title", "status", "detail", "request_id"} <= set(body), body
    assert body["status"] == status, body
    assert body["request_id"] and body["request_id"] == header(headers, "X-Request-ID"), (body, headers)


# ------------------------------------------------------------------------------ leak scan

_EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:Error|Exception|Warning)\b")
_FIXED_MARKERS = ("Traceback", 'File "', "site-packages", "/home/", "/work/", "/tmp/", "/usr/",
                  "/var/", "/etc/", "/root/", "fake-upstream-internal", "chatcmpl", "Bearer ",
                  "Authorization", "bytearray(", "object at 0x")
_PY_FILE = re.compile(r"[\w/.-]+\.py\b")


def leaks(text: str, extra: Iterable[str] = ()) -> list[str]:
    """What in ``text`` looks like internal detail (empty when nothing does)."""
    found = [m for m in (*_FIXED_MARKERS, *extra) if m and m in text]
    found += _EXCEPTION_NAME.findall(text)
    found += _PY_FILE.findall(text)
    return found


def leak_scan(exchanges: Iterable[Exchange], extra: Iterable[str] = ()) -> list[str]:
    """Every leak in every response body (and header value) of ``exchanges``."""
    extra = list(extra)
    problems: list[str] = []
    for ex in exchanges:
        text = ex.body if isinstance(ex.body, str) else json.dumps(ex.body)
        for hit in leaks(text, extra):
            problems.append(f"{ex.method} {ex.path} -> {ex.status}: body has {hit!r}")
        for name, value in ex.headers.items():
            if name.lower() in ("server", "date"):
                continue
            for hit in (m for m in (*_FIXED_MARKERS, *extra) if m and m in value):
                problems.append(f"{ex.method} {ex.path} -> {ex.status}: header {name} has {hit!r}")
    return problems


# ------------------------------------------------------------------------------ process figures


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (VmRSS from /proc), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def threads_of(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return None


def utterance(i: int, speaker: int, text: str, mid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "utterance", "speaker": f"spk_{speaker}", "start_ms": i * 1000,
                            "end_ms": i * 1000 + 900, "text": text}
    if mid is not None:
        body["id"] = mid
    return body


INTRODUCTIONS = ["Hello everyone, I'm Alice.", "This is Bob, joining from Berlin.",
                 "My name is Carol, I will send the minutes."]
