"""Finalize jobs and a full executor: a job waits for capacity instead of failing."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from ballast.app import build_app
from ballast.config import load_settings
from ballast.keys import EXECUTOR


async def _job(client: TestClient, sid: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/sessions/{sid}/finalize")
    job: dict[str, Any] = (await resp.json())["job"]
    return job


async def test_finalize_waits_for_a_full_bulkhead(tmp_path: Path, aiohttp_client: Any) -> None:
    config = load_settings(environ={
        "BALLAST__STORAGE__PATH": str(tmp_path / "b.db"),
        "BALLAST__PLUGINS__BULKHEAD__MAX_WORKERS": "1",
        "BALLAST__PLUGINS__BULKHEAD__MAX_QUEUE": "0",
    })
    app = build_app(config)
    client: TestClient = await aiohttp_client(app)
    assert (await client.post("/v1/sessions", json={"session_id": "s"})).status == 201
    resp = await client.post("/v1/sessions/s/mutations", json={"mutations": [
        {"type": "utterance", "speaker": "a", "start_ms": 0, "end_ms": 10, "text": "hi"}]})
    assert resp.status == 200

    gate = threading.Event()
    hog = asyncio.ensure_future(app[EXECUTOR].run(gate.wait, 10))  # the only worker, held
    await asyncio.sleep(0.05)
    # A request needing the executor is refused at once...
    assert (await client.post("/v1/sessions/s/resolve")).status == 503
    # ...but a finalize job waits for capacity rather than failing.
    assert (await client.post("/v1/sessions/s/finalize")).status == 202
    await asyncio.sleep(0.5)
    job = await _job(client, "s")
    assert job["state"] == "running"
    assert [st["state"] for st in job["stages"][:3]] == ["succeeded", "succeeded", "running"]
    gate.set()
    await hog
    for _ in range(200):
        job = await _job(client, "s")
        if job["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert job["state"] == "succeeded", job
