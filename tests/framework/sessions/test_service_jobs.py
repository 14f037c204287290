"""Finalize jobs in a real app: a full executor, a dead store writer."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import StoreError
from ballast.inference import ReportInput, ReportReply, ResolveInput, ResolveReply
from ballast.keys import EXECUTOR
from ballast.sessions.routes import SERVICE
from ballast.sessions.sqlite_store import SQLiteStore


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


async def _wait_job(client: TestClient, sid: str) -> dict[str, Any]:
    for _ in range(1500):
        job = await _job(client, sid)
        if job["state"] != "running":
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job of {sid} still running")


async def test_the_report_stage_waits_for_executor_capacity(tmp_path: Path, aiohttp_client: Any) -> None:
    """The builtin report runs on the executor; a full executor must not fail the job."""
    config = load_settings(environ={
        "BALLAST__STORAGE__PATH": str(tmp_path / "b.db"),
        "BALLAST__PLUGINS__BULKHEAD__MAX_WORKERS": "1",
        "BALLAST__PLUGINS__BULKHEAD__MAX_QUEUE": "0",
    })
    app = build_app(config)
    client: TestClient = await aiohttp_client(app)
    assert (await client.post("/v1/sessions", json={"session_id": "s"})).status == 201
    resp = await client.post("/v1/sessions/s/mutations", json={"mutations": [
        {"type": "utterance", "speaker": "a", "start_ms": 0, "end_ms": 10, "text": "hi, I'm Ann"}]})
    assert resp.status == 200

    service = app[SERVICE]
    provider = service.provider
    gate = threading.Event()
    hogs: list[asyncio.Future[Any]] = []

    class FullAtReport:
        """The real provider, with the executor filled by other work as the report starts."""

        async def resolve(self, data: ResolveInput) -> ResolveReply:
            return await provider.resolve(data)

        async def report(self, data: ReportInput) -> ReportReply:
            if not hogs:
                hogs.append(asyncio.ensure_future(app[EXECUTOR].run(gate.wait, 10)))
                await asyncio.sleep(0.05)  # the only worker is now taken
                asyncio.get_running_loop().call_later(0.5, gate.set)
            return await provider.report(data)

        async def close(self) -> None:
            await provider.close()

    service.provider = FullAtReport()
    assert (await client.post("/v1/sessions/s/finalize")).status == 202
    job = await _wait_job(client, "s")
    assert hogs and hogs[0].done()
    assert job["state"] == "succeeded", job
    assert (await client.get("/v1/sessions/s/report")).status == 200


class WriterKilled(BaseException):
    """Not an Exception: what a bug or an interpreter signal could raise in the writer."""


async def test_a_writer_that_dies_answers_every_caller_and_readiness_says_so(
        tmp_path: Path, aiohttp_client: Any) -> None:
    db = tmp_path / "b.db"
    app = build_app(load_settings(environ={"BALLAST__STORAGE__PATH": str(db)}))
    client: TestClient = await aiohttp_client(app)
    assert (await client.post("/v1/sessions", json={"session_id": "s"})).status == 201
    assert (await client.get("/readyz")).status == 200
    store = app[SERVICE].store
    assert isinstance(store, SQLiteStore) and store.failure is None

    def die(conn: Any) -> None:
        raise WriterKilled("the writer was killed")

    note = {"mutations": [{"type": "note", "text": "x"}]}
    # Hold the write lock so everything below queues up behind one blocked group.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    first = asyncio.ensure_future(client.post("/v1/sessions/s/mutations", json=note))
    await asyncio.sleep(0.2)
    killed = store._writes.submit(None, die)
    behind = [asyncio.ensure_future(client.post("/v1/sessions/s/mutations", json=note)) for _ in range(5)]
    await asyncio.sleep(0.2)
    blocker.execute("COMMIT")
    blocker.close()

    assert (await first).status == 200
    with pytest.raises(StoreError):
        await asyncio.wait_for(killed, 10)
    statuses = [(await asyncio.wait_for(r, 10)).status for r in behind]
    assert statuses == [500] * 5  # every caller is answered, none hangs
    assert store.failure == "WriterKilled"
    # Later writes fail at once; reads still work; readiness reports the dead store.
    assert (await asyncio.wait_for(client.post("/v1/sessions/s/mutations", json=note), 5)).status == 500
    assert (await client.get("/v1/sessions/s")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "unable to store data" in (await resp.json())["detail"]
