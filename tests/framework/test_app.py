"""The app factory's request path: request ids, health, readiness, OpenAPI, problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ballast.app import build_app
from ballast.config import load_settings
from ballast.keys import STATE


@pytest.fixture
async def client(tmp_path: Path, aiohttp_client: Any) -> TestClient:
    config = load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db")})
    app = build_app(config)
    return await aiohttp_client(app)


async def test_healthz_and_request_id(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    made = resp.headers["X-Request-ID"]
    assert len(made) >= 16
    resp = await client.get("/healthz", headers={"X-Request-ID": "client-chosen-id-123"})
    assert resp.headers["X-Request-ID"] == "client-chosen-id-123"
    for bad in ("short", "has space in it!", "x" * 300, "semi;colon-id-000"):
        resp = await client.get("/healthz", headers={"X-Request-ID": bad})
        assert resp.headers["X-Request-ID"] != bad


async def test_readyz_reports_draining(client: TestClient) -> None:
    assert (await client.get("/readyz")).status == 200
    app: web.Application = client.app  # type: ignore[assignment]
    app[STATE]["draining"] = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.headers["Retry-After"] == "1"
    body = await resp.json()
    assert body["detail"] == "The server is draining."
    assert body["request_id"] == resp.headers["X-Request-ID"]


async def test_openapi_generated_from_models(client: TestClient) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    for name in ("MutationBatch", "Session", "FinalizeJob", "Problem", "Utterance", "Report"):
        assert name in schemas, name
    assert schemas["Utterance"]["properties"]["start_ms"]["minimum"] == 0
    post = doc["paths"]["/v1/sessions/{session_id}/mutations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("MutationBatch")


async def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = await resp.json()
    assert set(body) >= {"type", "title", "status", "detail", "request_id"}
    resp = await client.delete("/healthz")
    assert resp.status == 405
    assert "GET" in resp.headers.get("Allow", "")
