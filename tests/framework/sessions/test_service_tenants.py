"""Tenants through the HTTP API: every route acts for the request's tenant only.

The tenant is whatever an authentication plugin put in ``request[TENANT]``; here a
small test plugin takes it from a header. Another tenant's session must be a 404
byte-for-byte the same (apart from ``request_id``) as a session that does not exist.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from ballast.app import build_app
from ballast.config import Config, load_settings
from ballast.hookspecs import hookimpl
from ballast.keys import TENANT
from ballast.middleware import Handler, MiddlewareSpec
from ballast.plugin_manager import load_plugins


class HeaderTenant:
    """Sets the tenant from ``X-Test-Tenant``, as an authentication plugin would from a key."""

    @hookimpl
    def ballast_middlewares(self, config: Config) -> list[MiddlewareSpec]:
        async def tenant(request: web.Request, handler: Handler) -> web.StreamResponse:
            name = request.headers.get("X-Test-Tenant")
            if name:
                request[TENANT] = name
            return await handler(request)

        return [MiddlewareSpec("test_tenant", 150, tenant)]


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/sessions/demo", None),
    ("GET", "/v1/sessions/demo/mutations", None),
    ("POST", "/v1/sessions/demo/mutations", {"mutations": [{"type": "note", "text": "b was here"}]}),
    ("POST", "/v1/sessions/demo/resolve", None),
    ("POST", "/v1/sessions/demo/finalize", None),
    ("GET", "/v1/sessions/demo/finalize", None),
    ("GET", "/v1/sessions/demo/report", None),
]


async def _answers(client: TestClient, tenant: str) -> list[tuple[int, str | None, dict[str, Any]]]:
    out = []
    for method, path, body in ROUTES:
        resp = await client.request(method, path, json=body, headers={"X-Test-Tenant": tenant})
        data = await resp.json()
        data.pop("request_id", None)
        out.append((resp.status, resp.headers.get("Content-Type"), data))
    return out


async def test_another_tenants_session_is_exactly_a_missing_one(tmp_path: Path, aiohttp_client: Any) -> None:
    config = load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "t.db")})
    app = build_app(config, load_plugins(config, eps=[], extra=[("test_tenant", HeaderTenant())]))
    client: TestClient = await aiohttp_client(app)
    a = {"X-Test-Tenant": "tenant-a"}

    before = await _answers(client, "tenant-b")  # nobody has "demo" yet
    assert [status for status, _, _ in before] == [404] * len(ROUTES)

    resp = await client.post("/v1/sessions", json={"session_id": "demo", "title": "A's"}, headers=a)
    assert resp.status == 201
    resp = await client.post("/v1/sessions/demo/mutations", headers=a, json={"mutations": [
        {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900, "text": "Hi, I'm Ann."}]})
    assert resp.status == 200
    assert (await client.post("/v1/sessions/demo/finalize", headers=a)).status == 202
    for _ in range(200):
        resp = await client.get("/v1/sessions/demo/finalize", headers=a)
        if (await resp.json())["job"]["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/v1/sessions/demo/report", headers=a)).status == 200

    # Tenant b, and the default tenant (no authentication), see exactly "missing".
    assert await _answers(client, "tenant-b") == before
    resp = await client.get("/v1/sessions/demo")
    assert resp.status == 404

    # Ids are per tenant: b may have its own demo, and it is b's alone.
    resp = await client.post("/v1/sessions", json={"session_id": "demo", "title": "B's"},
                             headers={"X-Test-Tenant": "tenant-b"})
    assert resp.status == 201
    view_b = await (await client.get("/v1/sessions/demo", headers={"X-Test-Tenant": "tenant-b"})).json()
    view_a = await (await client.get("/v1/sessions/demo", headers=a)).json()
    assert (view_b["title"], view_b["state"], view_b["last_seq"]) == ("B's", "open", 0)
    assert (view_a["title"], view_a["state"], view_a["last_seq"]) == ("A's", "finalized", 1)


async def test_a_batch_past_a_session_limit_is_a_409_problem(tmp_path: Path, aiohttp_client: Any) -> None:
    config = load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "t.db"),
                                    "BALLAST__SESSIONS__MAX_PARTICIPANTS": "3"})
    client: TestClient = await aiohttp_client(build_app(config))
    assert (await client.post("/v1/sessions", json={"session_id": "s"})).status == 201
    joined = [{"type": "participant_joined", "name": f"p{i}"} for i in range(4)]
    resp = await client.post("/v1/sessions/s/mutations", json={"mutations": joined})
    assert resp.status == 409
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = await resp.json()
    assert body["title"] == "Session limit reached"
    assert "at most 3 participants" in body["detail"]
    view = await (await client.get("/v1/sessions/s")).json()
    assert (view["last_seq"], view["participants"]) == (0, [])  # nothing half-applied
