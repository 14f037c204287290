"""queue_logging: a mutation that fails to apply is logged, and the session queue goes on.

The failure is real: a SQLite trigger in the server's own database file aborts any
insert of the mutation with id ``boom``, exactly as a constraint or a full disk would.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs
from support import ServerProcess, request

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import StoreError
from ballast.hookspecs import hookimpl
from ballast.plugin_manager import load_plugins
from ballast.plugins import queue_logging
from ballast.problems import GENERIC, PROBLEM_CONTENT_TYPE
from ballast.sessions.sqlite_store import SQLiteStore

TRIGGER = """
CREATE TRIGGER fail_boom BEFORE INSERT ON mutations WHEN NEW.mutation_id = 'boom'
BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
"""
LEAK_WORDS = ("injected", "failure", "trigger", "sqlite", "SQLITE", "Integrity", "Error", "boom")


def note(mid: str) -> dict[str, Any]:
    return {"id": mid, "type": "note", "text": f"note {mid}"}


def utterance(mid: str) -> dict[str, Any]:
    return {"id": mid, "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 10,
            "text": "hello"}


def install_trigger(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.executescript(TRIGGER)
    finally:
        conn.close()


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def assert_sanitized(status: int, headers: Any, body: Any) -> None:
    assert status == 500, body
    assert headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    assert (body["title"], body["detail"]) == GENERIC[500]
    assert body["request_id"] == headers["X-Request-ID"]
    text = json.dumps(body)
    for word in LEAK_WORDS:
        assert word not in text, f"{word!r} leaked into {text}"


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def test_a_failed_batch_is_logged_sanitized_and_the_queue_goes_on(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    with server:  # the first start creates the schema
        base = server.base_url
        for sid in ("s1", "s2"):
            assert request("POST", f"{base}/v1/sessions", {"session_id": sid})[0] == 201
        status, _, body = request("POST", f"{base}/v1/sessions/s1/mutations",
                                  {"mutations": [note("a1"), note("a2")]})
        assert (status, body["last_seq"]) == (200, 2)
    install_trigger(server.db)

    with server:
        url = f"{server.base_url}/v1/sessions/s1/mutations"
        async with aiohttp.ClientSession() as http:
            status, headers, body = await post(http, url, {"mutations": [
                note("n1"), utterance("boom"), note("n2")]})
            assert_sanitized(status, headers, body)
            failed_request_id = body["request_id"]

            # The next batch of the same session is applied, with no gap in seq.
            status, _, body = await post(http, url, {"mutations": [note("b1")]})
            assert (status, body["accepted"]) == (200, [{"id": "b1", "seq": 3, "duplicate": False}])

            # Many batches at once, one of them failing again: all the others apply.
            batches = [[note(f"c{i}")] for i in range(20)]
            batches.insert(7, [utterance("boom")])
            results = await asyncio.gather(*(post(http, url, {"mutations": b}) for b in batches))
            statuses = sorted(r[0] for r in results)
            assert statuses == [200] * 20 + [500]
            for status, headers, body in results:
                if status == 500:
                    assert_sanitized(status, headers, body)
            seqs = sorted(r[2]["accepted"][0]["seq"] for r in results if r[0] == 200)
            assert seqs == list(range(4, 24))

            async with http.get(url, params={"limit": 1000}) as resp:
                rows = (await resp.json())["mutations"]
            assert [r["seq"] for r in rows] == list(range(1, 24))
            ids = {r["id"] for r in rows}
            assert not ids & {"n1", "n2", "boom"}  # the failed batch left nothing behind
            status, _, body = await post(http, f"{server.base_url}/v1/sessions/s2/mutations",
                                         {"mutations": [note("x1")]})
            assert (status, body["last_seq"]) == (200, 1)

    logs = server.logs()
    failed = events(logs, "session.mutation_failed")
    first = [e for e in failed if e["batch_size"] == 3]
    assert [(e["mutation_id"], e["mutation_type"], e["batch_index"]) for e in first] == [
        ("n1", "note", 0), ("boom", "utterance", 1), ("n2", "note", 2)]
    for line in failed:
        assert line["session_id"] == "s1"
        assert line["level"] == "error"
        assert line["error_type"] == "IntegrityError"
        assert "injected failure" in line["error"]
    assert len(failed) == 4  # three for the first batch, one for the concurrent one
    [unhandled] = [e for e in events(logs, "error.unhandled") if e["request_id"] == failed_request_id]
    assert unhandled["error_type"] == "StoreError"


async def test_disabled_nothing_is_logged_but_the_queue_still_goes_on(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    db = tmp_path / "ballast.db"
    store = SQLiteStore(db)
    await store.open()  # the schema, as a first start would make it
    await store.close()
    install_trigger(db)
    path = tmp_path / "ballast.toml"
    path.write_text(f'[storage]\npath = "{db}"\n[plugins.queue_logging]\nenabled = false\n')
    config = load_settings(path, environ={})
    plugins = load_plugins(config, eps=[])
    assert not plugins.enabled("queue_logging")
    client = await aiohttp_client(build_app(config, plugins))
    assert (await client.post("/v1/sessions", json={"session_id": "s1"})).status == 201

    with capture_logs() as logs:
        resp = await client.post("/v1/sessions/s1/mutations", json={"mutations": [
            note("n1"), utterance("boom")]})
        assert_sanitized(resp.status, resp.headers, await resp.json())
        resp = await client.post("/v1/sessions/s1/mutations", json={"mutations": [note("n2")]})
        assert resp.status == 200
        assert (await resp.json())["accepted"][0]["seq"] == 1
    assert events(logs, "session.mutation_failed") == []
    assert len(events(logs, "error.unhandled")) == 1  # the sanitizer still logs the 500


async def test_a_client_error_is_not_a_mutation_failure(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "b.db"}"\n')
    config = load_settings(path, environ={})
    client = await aiohttp_client(build_app(config, load_plugins(config, eps=[])))
    assert (await client.post("/v1/sessions", json={"session_id": "s1"})).status == 201
    with capture_logs() as logs:
        resp = await client.post("/v1/sessions/nobody/mutations", json={"mutations": [note("a")]})
        assert resp.status == 404
        resp = await client.post("/v1/sessions/s1/mutations", json={"mutations": [note("a")]})
        assert resp.status == 200
    assert events(logs, "session.mutation_failed") == []


def test_hook_ballast_mutation_failed(tmp_path: Path) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.queue_logging]\nmax_logged_per_batch = 2\n")
    config = load_settings(path, environ={})
    plugins = load_plugins(config, eps=[])
    batch = [note(f"m{i}") for i in range(5)]
    error = StoreError(internal="disk I/O error while committing")
    with capture_logs() as logs:
        result = plugins.hook.ballast_mutation_failed(config=config, session_id="s9", mutations=batch,
                                                      error=error)
    assert result == []  # a notification: nothing is returned
    lines = events(logs, "session.mutation_failed")
    assert [(e["mutation_id"], e["batch_index"]) for e in lines] == [("m0", 0), ("m1", 1), (None, 2)]
    assert lines[-1]["omitted"] == 3
    for line in lines:
        assert (line["session_id"], line["batch_size"], line["log_level"]) == ("s9", 5, "error")
        assert (line["error_type"], line["error"]) == ("StoreError", "disk I/O error while committing")

    with capture_logs() as logs:
        plugins.hook.ballast_mutation_failed(config=config, session_id="s9", mutations=[utterance("u1")],
                                             error=ValueError("plain message"))
    [line] = events(logs, "session.mutation_failed")
    assert (line["mutation_type"], line["error_type"], line["error"]) == ("utterance", "ValueError",
                                                                           "plain message")


async def test_a_broken_failure_hook_does_not_stop_the_queue(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    class Broken:
        @hookimpl
        def ballast_mutation_failed(self, session_id: str, mutations: list[dict[str, Any]],
                                    error: BaseException) -> None:  # a subset of the arguments
            raise RuntimeError("the hook itself failed")

    db = tmp_path / "ballast.db"
    store = SQLiteStore(db)
    await store.open()
    await store.close()
    install_trigger(db)
    path = tmp_path / "ballast.toml"
    path.write_text(f'[storage]\npath = "{db}"\n')
    config = load_settings(path, environ={})
    client = await aiohttp_client(build_app(config, load_plugins(config, eps=[],
                                                                 extra=[("broken", Broken())])))
    assert (await client.post("/v1/sessions", json={"session_id": "s1"})).status == 201
    with capture_logs() as logs:
        resp = await client.post("/v1/sessions/s1/mutations", json={"mutations": [utterance("boom")]})
        assert_sanitized(resp.status, resp.headers, await resp.json())
        resp = await client.post("/v1/sessions/s1/mutations", json={"mutations": [note("ok")]})
        assert resp.status == 200
    [line] = events(logs, "hook.failed")
    assert (line["hook"], line["plugin"], line["error_type"]) == (
        "ballast_mutation_failed", "broken", "RuntimeError")
    # The builtin queue_logging implementation was still told about the failure.
    assert [e["mutation_id"] for e in events(logs, "session.mutation_failed")] == ["boom"]


def test_settings_defaults_and_bounds() -> None:
    s = queue_logging.Settings()
    assert (s.enabled, s.max_logged_per_batch) == (True, 500)
    for bad in (0, 501):
        with pytest.raises(ValueError):
            queue_logging.Settings(max_logged_per_batch=bad)
