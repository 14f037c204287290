"""auth: API keys, scopes, tenants and the per-key rate limit, through a real server.

Keys are made with the real ``ballast keys create`` into a keys file the server reads;
every check is an HTTP exchange with a ``ballast serve`` process on loopback.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess, request, run_cli

from ballast.plugins.auth import TokenBuckets, bearer_key


@dataclass
class Key:
    id: str
    key: str
    tenant: str
    scope: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def create_key(keys_file: Path, tenant: str, scope: str = "write") -> Key:
    result = run_cli("keys", "create", "--tenant", tenant, "--scope", scope,
                     "--keys-file", str(keys_file), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"id", "key", "tenant", "scope"}
    return Key(data["id"], data["key"], data["tenant"], data["scope"])


def auth_config(keys_file: Path, extra: str = "") -> str:
    return f'[plugins.auth]\nenabled = true\nkeys_file = "{keys_file}"\n' + extra


@dataclass
class Rig:
    server: ServerProcess
    keys_file: Path
    a_write: Key
    a_read: Key
    b_write: Key
    admin: Key

    def call(self, method: str, path: str, key: Key | None = None, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        hdrs = {**(key.auth if key else {}), **(headers or {})}
        return request(method, self.server.base_url + path, body, headers=hdrs)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("auth")
    keys_file = work / "keys.toml"
    keys = (create_key(keys_file, "acme"), create_key(keys_file, "acme", "read"),
            create_key(keys_file, "globex"), create_key(keys_file, "acme", "admin"))
    with ServerProcess(work / "srv", config=auth_config(keys_file)) as server:
        yield Rig(server, keys_file, *keys)
        raw = server.raw_logs()
    for key in keys:
        assert key.key not in raw, "an API key reached the server's logs"
        assert key.key[3:] not in raw


def assert_401(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 401, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert body["status"] == 401 and body["request_id"] == headers["X-Request-ID"]


# ------------------------------------------------------------------------------ who gets in


def test_keys_file_holds_hashes_only_with_mode_0600(rig: Rig) -> None:
    text = rig.keys_file.read_text()
    for key in (rig.a_write, rig.a_read, rig.b_write, rig.admin):
        assert key.key.startswith("bk_") and len(key.key) >= 3 + 32
        assert key.key not in text and key.id in text
    assert rig.keys_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    "bearer bk_unknown_key_000000000000000000000000000",
                                    "Bearer bk_x bk_y", "Token abc"])
def test_missing_malformed_or_unknown_key_is_401(rig: Rig, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in (("GET", "/v1/sessions/demo", None), ("POST", "/v1/sessions", {}),
                               ("GET", "/v1/no-such-route", None)):
        status, hdrs, parsed = rig.call(method, path, body=body, headers=headers)
        assert_401(status, hdrs, parsed)


def test_every_401_reads_the_same(rig: Rig) -> None:
    """No oracle: a missing, a malformed and an unknown key get the same problem."""
    bodies = []
    for headers in ({}, {"Authorization": "Basic x"}, {"Authorization": "Bearer bk_nope_nope_nope"}):
        status, _, body = rig.call("GET", "/v1/sessions/demo", headers=headers)
        assert status == 401
        bodies.append({k: v for k, v in body.items() if k != "request_id"})
    assert bodies[0] == bodies[1] == bodies[2]


def test_open_endpoints_need_no_key(rig: Rig) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        status, headers, _ = rig.call("GET", path)
        assert status == 200, path
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_a_write_key_creates_and_reads_its_session(rig: Rig) -> None:
    status, headers, body = rig.call("POST", "/v1/sessions", rig.a_write, {"session_id": "own-1"})
    assert status == 201, body
    assert headers["Cache-Control"] == "no-store"
    status, _, body = rig.call("POST", "/v1/sessions/own-1/mutations", rig.a_write,
                               {"mutations": [{"type": "note", "text": "hello"}]})
    assert status == 200, body
    status, _, body = rig.call("GET", "/v1/sessions/own-1", rig.a_read)
    assert status == 200 and body["mutation_count"] == 1, body


def test_a_read_key_cannot_write(rig: Rig) -> None:
    status, headers, body = rig.call("POST", "/v1/sessions", rig.a_read, {"session_id": "ro-1"})
    assert status == 403, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert "WWW-Authenticate" not in headers
    status, _, body = rig.call("GET", "/v1/sessions/ro-1", rig.a_write)
    assert status == 404, "a refused write must change nothing"


def test_revocation_takes_effect_within_two_seconds_without_restart(rig: Rig) -> None:
    key = create_key(rig.keys_file, "acme")
    deadline = time.monotonic() + 3
    status = 0
    while time.monotonic() < deadline:  # a new key is picked up as well
        status, _, _ = rig.call("GET", "/v1/sessions/own-1", key)
        if status != 401:
            break
        time.sleep(0.1)
    assert status in (200, 404)
    result = run_cli("keys", "revoke", key.id, "--keys-file", str(rig.keys_file))
    assert result.returncode == 0, result.stderr
    revoked_at = time.monotonic()
    while True:
        status, headers, body = rig.call("GET", "/v1/sessions/own-1", key)
        if status == 401:
            break
        assert time.monotonic() - revoked_at < 2.0, "revocation not in force after 2 s"
        time.sleep(0.05)
    assert_401(status, headers, body)
    listed = json.loads(run_cli("keys", "list", "--json", "--keys-file", str(rig.keys_file)).stdout)
    row = next(r for r in listed if r["id"] == key.id)
    assert row["revoked"] and "key" not in row and "hash" not in row


def test_refusals_are_logged_without_the_key(rig: Rig) -> None:
    bad = "bk_" + "Z" * 43
    status, _, body = rig.call("GET", "/v1/sessions/own-1", headers={"Authorization": f"Bearer {bad}"})
    assert status == 401
    status, _, forbidden = rig.call("POST", "/v1/sessions", rig.a_read, {})
    assert status == 403
    deadline = time.monotonic() + 5
    denied: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = rig.server.logs()
        denied = [ln for ln in lines if ln["event"] == "auth.denied"
                  and ln.get("request_id") in (body["request_id"], forbidden["request_id"])]
        if len(denied) == 2:
            break
        time.sleep(0.05)
    assert {(d["reason"], d["key_id"]) for d in denied} == {("unknown", None), ("scope", rig.a_read.id)}
    assert bad not in rig.server.raw_logs()
    assert rig.a_read.key not in rig.server.raw_logs()


def test_a_key_in_the_path_is_scrubbed_from_the_request_line(rig: Rig) -> None:
    """A confused client pasting its key into a URL must not leave it in the logs."""
    status, _, body = rig.call("GET", f"/v1/sessions/{rig.a_write.key}", rig.a_write)
    assert status == 404, body
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in rig.server.logs() if ln.get("request_id") == body["request_id"]
                 and ln["event"] == "http.request"]
        if lines:
            break
        time.sleep(0.05)
    assert lines and rig.a_write.key not in json.dumps(lines)
    assert rig.a_write.key not in rig.server.raw_logs()


# ------------------------------------------------------------------------------ tenants


def _problem_sans_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


def test_another_tenants_session_is_404_byte_for_byte_like_a_missing_one(rig: Rig) -> None:
    status, _, body = rig.call("POST", "/v1/sessions", rig.a_write, {"session_id": "secret-a"})
    assert status == 201, body
    rig.call("POST", "/v1/sessions/secret-a/mutations", rig.a_write,
             {"mutations": [{"type": "note", "text": "acme only"}]})
    for suffix in ("", "/mutations", "/report", "/finalize"):
        status_b, headers_b, other = rig.call("GET", f"/v1/sessions/secret-a{suffix}", rig.b_write)
        # A missing session whose id has the same length: the answers may differ only
        # where they quote the id the client asked for (and in request_id).
        status_m, headers_m, missing = rig.call("GET", f"/v1/sessions/secret-z{suffix}", rig.b_write)
        assert (status_b, status_m) == (404, 404), (suffix, other, missing)
        expected = json.loads(json.dumps(_problem_sans_id(missing)).replace("secret-z", "secret-a"))
        assert _problem_sans_id(other) == expected, suffix
        assert headers_b["Content-Length"] == headers_m["Content-Length"]
    for action in ("resolve", "finalize"):
        status, _, body = rig.call("POST", f"/v1/sessions/secret-a/{action}", rig.b_write)
        assert status == 404, (action, body)
    status, _, body = rig.call("POST", "/v1/sessions/secret-a/mutations", rig.b_write,
                               {"mutations": [{"type": "note", "text": "globex was here"}]})
    assert status == 404, body
    status, _, body = rig.call("GET", "/v1/sessions/secret-a", rig.a_write)
    assert status == 200 and body["mutation_count"] == 1, body


def test_two_tenants_may_both_have_demo(rig: Rig) -> None:
    for key in (rig.a_write, rig.b_write):
        status, _, body = rig.call("POST", "/v1/sessions", key, {"session_id": "demo", "title": key.tenant})
        assert status == 201, (key.tenant, body)
    for key in (rig.a_write, rig.b_write):
        status, _, body = rig.call("GET", "/v1/sessions/demo", key)
        assert status == 200 and body["title"] == key.tenant, body


# ------------------------------------------------------------------------------ rate limit


def test_rate_limit_answers_429_with_retry_after_past_the_burst(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    key, other = create_key(keys_file, "acme"), create_key(keys_file, "acme")
    # One token every 20 s: nothing refills during the burst below.
    config = auth_config(keys_file, "rate_per_s = 0.05\nburst = 5\n")
    with ServerProcess(tmp_path / "srv", config=config) as server:
        statuses = []
        for _ in range(7):
            status, headers, body = request("GET", server.base_url + "/v1/sessions/x", headers=key.auth)
            statuses.append(status)
        assert statuses[:5] == [404] * 5, statuses
        assert statuses[5:] == [429, 429], statuses
        assert body["status"] == 429 and headers["Content-Type"].startswith("application/problem+json")
        assert 1 <= int(headers["Retry-After"]) <= 20
        # The bucket is per key: another key of the same tenant is not limited.
        status, _, _ = request("GET", server.base_url + "/v1/sessions/x", headers=other.auth)
        assert status == 404


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(2.0, 3, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("k") == 0.0
    assert buckets.take("k") > 0
    now[0] += 100
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]  # capped at burst
    assert buckets.take("k") > 0
    assert buckets.take("other") == 0.0


# ------------------------------------------------------------------------------ metrics scope


def test_protect_metrics_needs_an_admin_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    admin, writer = create_key(keys_file, "ops", "admin"), create_key(keys_file, "ops", "write")
    config = auth_config(keys_file, "protect_metrics = true\n")
    with ServerProcess(tmp_path / "srv", config=config) as server:
        url = server.base_url + "/metrics"
        status, headers, body = request("GET", url)
        assert_401(status, headers, body)
        status, _, _ = request("GET", url, headers=writer.auth)
        assert status == 403
        status, _, _ = request("GET", url, headers=admin.auth)
        # Past auth: the metrics endpoint itself (404 where no metrics plugin serves it).
        assert status not in (401, 403)


# ------------------------------------------------------------------------------ fuzzing


def _raw_get(port: int, auth: bytes) -> int:
    head = (b"GET /v1/sessions/demo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + auth
            + b"\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


_header_bytes = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=200).map(lambda t: t.replace("\r", "").replace("\n", "").encode()),
    st.builds(lambda s, k: (s + " " + k).encode(),
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Digest", "Token", "", "Bearer  "]),
              st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=120)),
    st.integers(0, 20_000).map(lambda n: b"Bearer " + b"A" * n),
    st.integers(0, 2000).map(lambda n: b"Bearer" + b" " * n + b"bk_x"),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("auth-fuzz")
    create_key(work / "keys.toml", "acme")
    with ServerProcess(work / "srv", config=auth_config(work / "keys.toml")) as server:
        yield server


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_header_bytes)
def test_fuzzed_authorization_headers_are_refused_never_5xx(fuzz_server: ServerProcess, value: bytes) -> None:
    status = _raw_get(fuzz_server.port, value)
    # The HTTP parser itself refuses control characters and oversized header lines
    # (400) before any key is looked at; everything else is a 401.
    parser_refuses = len(value.strip(b" \t")) > 8190 or any((b < 32 and b != 9) or b == 127 for b in value)
    assert status == (400 if parser_refuses else 401), (status, value[:80])


def test_bearer_key_parsing() -> None:
    assert bearer_key("Bearer bk_abc") == "bk_abc"
    assert bearer_key("bearer   bk_abc  ") == "bk_abc"
    for bad in (None, "", "Bearer", "Bearer ", "Basic bk_abc", "Bearer a b", "Bearer bk_\u00e9",
                "Bearer " + "a" * 5000, "Bearer bk_\x01"):
        assert bearer_key(bad) is None, bad


# ------------------------------------------------------------------------------ in process


class _Counts:
    """A minimal exporter: what ballast_auth_denied_total was told."""

    def __init__(self) -> None:
        self.denied: dict[tuple[str, ...], float] = {}

    def inc(self, spec: Any, labels: tuple[str, ...], amount: float) -> None:
        if spec.name == "ballast_auth_denied_total":
            self.denied[labels] = self.denied.get(labels, 0) + amount

    def observe(self, spec: Any, labels: tuple[str, ...], value: float) -> None:
        pass

    def set(self, spec: Any, labels: tuple[str, ...], value: float) -> None:
        pass

    def sample(self, spec: Any, labels: tuple[str, ...], read: Any) -> None:
        pass


async def test_refusals_are_counted_by_reason_and_the_tenant_is_set(
        tmp_path: Path, aiohttp_client: Any) -> None:
    from aiohttp import web

    from ballast.app import build_app
    from ballast.config import load_settings
    from ballast.keys import TELEMETRY, tenant_of

    keys_file = tmp_path / "keys.toml"
    writer, reader = create_key(keys_file, "acme"), create_key(keys_file, "acme", "read")
    config = load_settings(environ={
        "BALLAST__STORAGE__PATH": str(tmp_path / "b.db"), "BALLAST__STORAGE__DURABILITY": "normal",
        "BALLAST__PLUGINS__AUTH__ENABLED": "true", "BALLAST__PLUGINS__AUTH__KEYS_FILE": str(keys_file),
        "BALLAST__PLUGINS__AUTH__BURST": "3", "BALLAST__PLUGINS__AUTH__RATE_PER_S": "0.01"})
    app = build_app(config)
    counts = _Counts()
    app[TELEMETRY].attach(counts)
    seen: list[str] = []

    async def whoami(request: web.Request) -> web.Response:
        seen.append(tenant_of(request))
        return web.json_response({})

    app.router.add_get("/v1/whoami", whoami)
    client = await aiohttp_client(app)
    assert (await client.get("/v1/whoami")).status == 401
    assert (await client.get("/v1/whoami", headers={"Authorization": "Basic x"})).status == 401
    assert (await client.get("/v1/whoami", headers={"Authorization": "Bearer bk_nope"})).status == 401
    assert (await client.post("/v1/sessions", json={}, headers=reader.auth)).status == 403
    statuses = [(await client.get("/v1/whoami", headers=writer.auth)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert seen == ["acme"] * 3
    assert counts.denied == {("missing",): 1, ("malformed",): 1, ("unknown",): 1, ("scope",): 1,
                             ("rate_limited",): 1}


@pytest.mark.parametrize("path", ["/v1/sessions/../sessions/own-1", "/%761/sessions/own-1",
                                  "//v1/sessions/own-1", "/v1//sessions/own-1", "/v1/sessions/own-1/",
                                  "/V1/sessions/own-1",
                                  "/v1/sessions/own-1?x=/healthz", "/healthz/../v1/sessions/own-1",
                                  "/v1/sessions/own%2D1", "/v1%2Fsessions%2Fown-1"])
def test_other_spellings_of_a_v1_path_are_not_a_way_around(rig: Rig, path: str) -> None:
    status, _, body = rig.call("POST", "/v1/sessions", rig.a_write, {"session_id": "own-1"})
    assert status in (201, 409), body
    raw = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", rig.server.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status in (401, 404), (path, data[:300])
    assert b'"session_id"' not in data, path

