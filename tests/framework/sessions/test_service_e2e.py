"""The session service end to end, against a real `ballast serve` process and SQLite file."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstreamProcess
from support import ServerProcess, request

INTROS = ["Hello everyone, I'm Alice.", "This is Bob, joining from Berlin.", "My name is Carol.",
          "Dave here, I will send the minutes."]


def utterance(i: int, speaker: int, mid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "utterance", "speaker": f"spk_{speaker}", "start_ms": i * 1000,
                            "end_ms": i * 1000 + 900,
                            "text": INTROS[speaker] if i < 4 else f"point number {i} about the budget"}
    if mid is not None:
        body["id"] = mid
    return body


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def _poll_job(http: aiohttp.ClientSession, base: str, sid: str, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with http.get(f"{base}/v1/sessions/{sid}/finalize") as resp:
            job: dict[str, Any] = (await resp.json())["job"]
        if job["state"] != "running":
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job still running after {within}s: {job}")


async def test_full_flow_1000_mutations_from_20_clients(tmp_path: Path) -> None:
    with ServerProcess(tmp_path) as server:
        base = server.base_url
        async with aiohttp.ClientSession() as http:
            status, body = await _post(http, f"{base}/v1/sessions", {
                "session_id": "meet-1", "title": "Budget sync",
                "participants": [{"name": n} for n in ("Alice", "Bob", "Carol", "Dave")]})
            assert status == 201, body
            assert body["state"] == "open" and body["last_seq"] == 0
            # The four introductions first, in order, then 996 more from 20 clients.
            status, body = await _post(http, f"{base}/v1/sessions/meet-1/mutations",
                                       {"mutations": [utterance(i, i, f"u{i}") for i in range(4)]})
            assert status == 200 and [a["seq"] for a in body["accepted"]] == [1, 2, 3, 4]
            acked: list[tuple[int, str]] = []

            async def client(c: int) -> None:
                for i in range(4 + c, 1000, 20):
                    st, resp = await _post(http, f"{base}/v1/sessions/meet-1/mutations",
                                           {"mutations": [utterance(i, i % 4, f"u{i}")]})
                    assert st == 200, resp
                    acked.append((resp["accepted"][0]["seq"], f"u{i}"))

            await asyncio.gather(*(client(c) for c in range(20)))
            assert len(acked) == 996
            # Seqs are gapless and each client's own mutations were applied in its order.
            assert sorted(s for s, _ in acked) == list(range(5, 1001))
            rows: list[dict[str, Any]] = []
            after = 0
            while True:
                async with http.get(f"{base}/v1/sessions/meet-1/mutations",
                                    params={"after": after, "limit": 1000}) as resp:
                    page = await resp.json()
                rows.extend(page["mutations"])
                if page["next_after"] is None:
                    break
                after = page["next_after"]
            assert [r["seq"] for r in rows] == list(range(1, 1001))
            by_id = {r["id"]: r["seq"] for r in rows}
            assert all(by_id[mid] == seq for seq, mid in acked)
            for c in range(20):
                mine = [by_id[f"u{i}"] for i in range(4 + c, 1000, 20)]
                assert mine == sorted(mine)

            status, body = await _post(http, f"{base}/v1/sessions/meet-1/resolve", None)
            assert status == 200, body
            assert body["speakers"] == {"spk_0": "Alice", "spk_1": "Bob", "spk_2": "Carol", "spk_3": "Dave"}

            status, body = await _post(http, f"{base}/v1/sessions/meet-1/finalize", None)
            assert status == 202 and body["job"]["attempt"] == 1
            job = await _poll_job(http, base, "meet-1")
            assert job["state"] == "succeeded", job
            assert [s["name"] for s in job["stages"]] == [
                "freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist"]
            assert all(s["state"] == "succeeded" for s in job["stages"])
            async with http.get(f"{base}/v1/sessions/meet-1/report") as resp:
                assert resp.status == 200
                report = await resp.json()
            assert report["stats"]["utterance_count"] == 1000
            assert {s["name"] for s in report["speakers"]} == {"Alice", "Bob", "Carol", "Dave"}
            assert sum(s["talk_time_ms"] for s in report["speakers"]) == 1000 * 900
            assert report["summary"]
            async with http.get(f"{base}/v1/sessions/meet-1") as resp:
                session = await resp.json()
            assert session["state"] == "finalized" and session["mutation_count"] == 1001
            assert session["finalize"]["state"] == "succeeded"
            # Finalized: no more mutations, and a second finalize returns the same job.
            status, body = await _post(http, f"{base}/v1/sessions/meet-1/mutations",
                                       {"mutations": [utterance(2000, 0)]})
            assert status == 409 and body["status"] == 409
            status, body = await _post(http, f"{base}/v1/sessions/meet-1/finalize", None)
            assert status == 202 and body["job"]["state"] == "succeeded" and body["job"]["attempt"] == 1


def test_idempotent_retries_and_restart(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    base = server.base_url
    assert request("POST", base + "/v1/sessions", {"session_id": "s"})[0] == 201
    assert request("POST", base + "/v1/sessions", {"session_id": "s"})[0] == 409
    batch = {"mutations": [utterance(i, 0, f"m{i}") for i in range(5)]}
    status, _, first = request("POST", base + "/v1/sessions/s/mutations", batch)
    assert status == 200 and [a["duplicate"] for a in first["accepted"]] == [False] * 5
    status, _, again = request("POST", base + "/v1/sessions/s/mutations", batch)
    assert status == 200
    assert [a["seq"] for a in again["accepted"]] == [a["seq"] for a in first["accepted"]]
    assert all(a["duplicate"] for a in again["accepted"])
    # A mixed batch: old ids are duplicates, a new one gets the next seq.
    mixed = {"mutations": [utterance(1, 0, "m1"), {"type": "note", "text": "n", "id": "n1"}]}
    status, _, body = request("POST", base + "/v1/sessions/s/mutations", mixed)
    assert [(a["seq"], a["duplicate"]) for a in body["accepted"]] == [(2, True), (6, False)]
    before = request("GET", base + "/v1/sessions/s")[2]
    assert before["mutation_count"] == 6 and before["last_seq"] == 6
    assert server.stop() == 0

    server = ServerProcess(tmp_path, port=server.port).start()
    after = request("GET", server.base_url + "/v1/sessions/s")[2]
    assert after == before
    rows = request("GET", server.base_url + "/v1/sessions/s/mutations?after=0&limit=100")[2]["mutations"]
    assert [r["id"] for r in rows] == ["m0", "m1", "m2", "m3", "m4", "n1"]
    assert server.stop() == 0


def test_kill_9_loses_no_acknowledged_mutation(tmp_path: Path) -> None:
    """Clients stream mutations; the server is SIGKILLed mid-stream; all 200s survive."""
    server = ServerProcess(tmp_path).start()
    base = server.base_url
    for s in range(3):
        assert request("POST", base + "/v1/sessions", {"session_id": f"k{s}"})[0] == 201
    acked: dict[str, set[str]] = {f"k{s}": set() for s in range(3)}
    sent = 0

    async def stream(client: int) -> None:
        nonlocal sent
        rng = random.Random(client)
        async with aiohttp.ClientSession() as http:
            i = 0
            while True:
                sid = f"k{rng.randrange(3)}"
                ids = [f"c{client}-{i + j}" for j in range(rng.randint(1, 5))]
                i += len(ids)
                batch = {"mutations": [{"id": m, "type": "note", "text": m} for m in ids]}
                sent += len(ids)
                try:
                    async with http.post(f"{base}/v1/sessions/{sid}/mutations", json=batch) as resp:
                        if resp.status == 200:
                            acked[sid].update(ids)
                except (aiohttp.ClientError, ConnectionError):
                    return

    async def run() -> None:
        tasks = [asyncio.create_task(stream(c)) for c in range(16)]
        await asyncio.sleep(1.5)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    server.proc.wait()  # type: ignore[union-attr]
    total_acked = sum(len(v) for v in acked.values())
    assert total_acked > 100, "the load did not get going before the kill"

    server = ServerProcess(tmp_path, port=server.port).start()
    lost = duplicated = 0
    for sid, ids in acked.items():
        rows = request("GET", f"{server.base_url}/v1/sessions/{sid}/mutations?after=0&limit=1000")[2]
        stored: list[str] = []
        body = rows
        while True:
            stored.extend(r["id"] for r in body["mutations"])
            if body["next_after"] is None:
                break
            body = request("GET", f"{server.base_url}/v1/sessions/{sid}/mutations"
                                  f"?after={body['next_after']}&limit=1000")[2]
        lost += len(ids - set(stored))
        duplicated += len(stored) - len(set(stored))
    print(f"kill -9: sent={sent} acknowledged={total_acked} lost={lost} duplicated={duplicated}")
    assert (lost, duplicated) == (0, 0)
    assert server.stop() == 0


@pytest.mark.parametrize("provider", ["openai"])
def test_openai_provider_through_the_server(tmp_path: Path, provider: str) -> None:
    with FakeUpstreamProcess() as fake:
        config = (f'[inference]\nprovider = "{provider}"\nbase_url = "{fake.base_url}"\n'
                  'model = "test-model"\napi_key_env = "BALLAST_TEST_API_KEY"\n')
        with ServerProcess(tmp_path, config=config,
                           env={"BALLAST_TEST_API_KEY": "sk-test-secret-0042"}) as server:
            base = server.base_url
            request("POST", base + "/v1/sessions",
                    {"session_id": "o", "participants": [{"name": "Alice"}, {"name": "Bob"}]})
            request("POST", base + "/v1/sessions/o/mutations", {"mutations": [
                utterance(0, 0), utterance(1, 1), utterance(5, 0)]})
            status, _, body = request("POST", base + "/v1/sessions/o/resolve")
            assert status == 200 and body["speakers"] == {"spk_0": "Alice", "spk_1": "Bob"}
            status, _, body = request("POST", base + "/v1/sessions/o/finalize")
            assert status == 202
            deadline = time.monotonic() + 30
            while body["job"]["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
                body = request("GET", base + "/v1/sessions/o/finalize")[2]
            assert body["job"]["state"] == "succeeded", body
            report = request("GET", base + "/v1/sessions/o/report")[2]
            assert report["summary"]
            seen = fake.requests()
            assert len(seen) == 2
            assert all(r["headers"].get("Authorization") == "Bearer sk-test-secret-0042" for r in seen)
        assert "sk-test-secret-0042" not in server.raw_logs()
