"""bulkhead: blocking work gets a bounded pool, and overload is refused at once.

The executor is driven with real threads held on a ``threading.Event``, then the whole
server is flooded with a pool of one thread and no wait queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs
from support import ServerProcess

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import Overloaded
from ballast.executor import LoopDefaultExecutor
from ballast.keys import EXECUTOR
from ballast.logging import get_logger
from ballast.plugin_manager import load_plugins
from ballast.plugins import bulkhead
from ballast.plugins.bulkhead import BoundedExecutor, Settings
from ballast.problems import PROBLEM_CONTENT_TYPE
from ballast.telemetry import Telemetry

POOL_PREFIX = "ballast-blocking"


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def pool_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(POOL_PREFIX))


def held(gate: threading.Event, value: int) -> int:
    if not gate.wait(timeout=30):
        raise AssertionError("the gate was never opened")
    return value


# --------------------------------------------------------------------------------------
# the executor
# --------------------------------------------------------------------------------------


async def test_a_flood_admits_workers_plus_queue_and_refuses_the_rest() -> None:
    executor = BoundedExecutor(max_workers=2, max_queue=2, retry_after_s=3)
    gate = threading.Event()
    baseline = threading.active_count()
    try:
        with capture_logs() as logs:
            tasks = [asyncio.ensure_future(executor.run(held, gate, i)) for i in range(50)]
            done, pending = await asyncio.wait(tasks, timeout=0.5)
        assert (len(done), len(pending)) == (46, 4)
        assert (executor.in_flight, executor.rejected) == (4, 46)
        for task in done:
            exc = task.exception()
            assert isinstance(exc, Overloaded)
            assert exc.status == 503
            assert exc.headers == {"Retry-After": "3"}
        rejected = events(logs, "bulkhead.rejected")
        assert len(rejected) == 46
        assert {(e["max_workers"], e["max_queue"], e["in_flight"]) for e in rejected} == {(2, 2, 4)}
        # Threads do not grow with the load: two workers, whatever the queue holds.
        assert pool_threads() <= 2
        assert threading.active_count() <= baseline + 2 + 2

        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*pending), timeout=10)
        assert sorted(results) == sorted(t.result() for t in pending)
        assert executor.in_flight == 0

        # Capacity is back: a full set of work is admitted again, and more is refused.
        again = [executor.run(held, gate, i) for i in range(4)]
        assert sorted(await asyncio.wait_for(asyncio.gather(*again), timeout=10)) == [0, 1, 2, 3]
        assert executor.rejected == 46
    finally:
        gate.set()
        executor.shutdown()


async def test_a_cancelled_caller_keeps_its_slot_until_the_thread_is_done() -> None:
    executor = BoundedExecutor(max_workers=1, max_queue=0)
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(executor.run(held, gate, 1))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(Overloaded):  # the thread is still busy with the first call
            await executor.run(held, gate, 2)
        gate.set()
        deadline = time.monotonic() + 10
        while executor.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.01)
        assert await executor.run(held, gate, 3) == 3
    finally:
        gate.set()
        executor.shutdown()


async def test_context_variables_reach_the_worker_thread() -> None:
    executor = BoundedExecutor(max_workers=1, max_queue=0)
    log = get_logger("test.bulkhead")

    def in_thread() -> tuple[str, Any]:
        log.info("test.in_thread")
        return threading.current_thread().name, structlog.contextvars.get_contextvars().get("request_id")

    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs, \
                structlog.contextvars.bound_contextvars(request_id="rid-in-thread-42"):
            name, rid = await executor.run(in_thread)
        assert name.startswith(POOL_PREFIX)
        assert rid == "rid-in-thread-42"
        [line] = events(logs, "test.in_thread")
        assert line["request_id"] == "rid-in-thread-42"
    finally:
        executor.shutdown()


async def test_after_shutdown_work_is_refused_not_lost() -> None:
    executor = BoundedExecutor(max_workers=1, max_queue=1)
    executor.shutdown()
    with pytest.raises(Overloaded):
        await executor.run(lambda: 1)
    assert executor.in_flight == 0


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        BoundedExecutor(max_workers=0, max_queue=1)
    with pytest.raises(ValueError, match="max_queue"):
        BoundedExecutor(max_workers=1, max_queue=-1)
    s = Settings()
    assert (s.enabled, s.max_workers, s.max_queue, s.retry_after_s) == (True, 8, 64, 1)
    with pytest.raises(ValueError):
        Settings(max_workers=0)


async def test_hook_ballast_executor(tmp_path: Path) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.bulkhead]\nmax_workers = 3\nmax_queue = 5\nretry_after_s = 2\n")
    config = load_settings(path, environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db")})
    plugins = load_plugins(config, eps=[])
    # first result wins: one object
    executor = plugins.hook.ballast_executor(config=config, telemetry=Telemetry())
    try:
        assert isinstance(executor, BoundedExecutor)
        assert (executor.max_workers, executor.max_queue, executor.retry_after_s) == (3, 5, 2)
        assert isinstance(bulkhead.ballast_executor(config=config, telemetry=Telemetry()), BoundedExecutor)
        assert isinstance(build_app(config, plugins)[EXECUTOR], BoundedExecutor)
    finally:
        executor.shutdown()

    disabled = load_settings(path, environ={"BALLAST__PLUGINS__BULKHEAD__ENABLED": "false"})
    plugins = load_plugins(disabled, eps=[])
    assert plugins.hook.ballast_executor(config=disabled, telemetry=Telemetry()) is None
    fallback = build_app(disabled, plugins)[EXECUTOR]
    assert isinstance(fallback, LoopDefaultExecutor)
    assert await fallback.run(sum, [1, 2]) == 3


# --------------------------------------------------------------------------------------
# through the server
# --------------------------------------------------------------------------------------


async def _call(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, Any, Any]:
    async with http.request(method, url) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def _finished(http: aiohttp.ClientSession, url: str, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status, _, body = await _call(http, "GET", url)
        assert status == 200, body
        if body["job"]["state"] != "running":
            return dict(body["job"])
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def test_an_overloaded_server_answers_503_then_recovers(tmp_path: Path) -> None:
    config = "[plugins.bulkhead]\nmax_workers = 1\nmax_queue = 0\nretry_after_s = 2\n"
    # The bulkhead's own refusals are under test: admission control would refuse part of
    # this burst of 63 first (resolve and finalize may fill 75% of its initial limit).
    config += "[plugins.adaptive_concurrency]\nenabled = false\n"
    with ServerProcess(tmp_path, config, env={"BALLAST__STORAGE__DURABILITY": "normal"}) as server:
        base = server.base_url
        async with aiohttp.ClientSession() as http:
            sessions = ["big", "f1", "f2", "f3"]
            for sid in sessions:
                async with http.post(f"{base}/v1/sessions", json={
                        "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]}) as r:
                    assert r.status == 201
            for sid, batches in (("big", 8), ("f1", 1), ("f2", 1), ("f3", 1)):
                for b in range(batches):
                    mutations = [{"type": "utterance", "speaker": f"spk_{i % 2}",
                                  "start_ms": (b * 500 + i) * 1000, "end_ms": (b * 500 + i) * 1000 + 900,
                                  "text": "Hi, I am Alice." if i == 0 else f"point {b}-{i}"}
                                 for i in range(500)]
                    async with http.post(f"{base}/v1/sessions/{sid}/mutations",
                                         json={"mutations": mutations}) as r:
                        assert r.status == 200

            calls = [("POST", f"{base}/v1/sessions/big/resolve")] * 40
            calls += [("POST", f"{base}/v1/sessions/{sid}/finalize") for sid in sessions[1:]]
            calls += [("GET", f"{base}/v1/sessions/big")] * 10
            calls += [("GET", f"{base}/v1/sessions/big/mutations?limit=5")] * 10
            results = await asyncio.gather(*(_call(http, m, u) for m, u in calls))

            statuses = [status for status, _, _ in results]
            assert 500 not in statuses
            assert set(statuses) <= {200, 202, 503}, statuses
            refused = [(h, b) for s, h, b in results if s == 503]
            assert refused, "nothing was refused with one thread and no queue"
            for headers, body in refused:
                assert headers["Retry-After"] == "2"
                assert headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
                assert body["status"] == 503
                assert body["request_id"] == headers["X-Request-ID"]
            assert all(s in (200, 202) for s, _, _ in results[40:])  # no blocking work there

            # Service resumes: jobs end, a refused job runs again, resolve answers.
            for sid in sessions[1:]:
                job = await _finished(http, f"{base}/v1/sessions/{sid}/finalize")
                if job["state"] != "succeeded":
                    status, _, _ = await _call(http, "POST", f"{base}/v1/sessions/{sid}/finalize")
                    assert status == 202
                    job = await _finished(http, f"{base}/v1/sessions/{sid}/finalize")
                assert job["state"] == "succeeded", job
            status, _, body = await _call(http, "POST", f"{base}/v1/sessions/big/resolve")
            assert status == 200, body
            assert body["speakers"]["spk_0"] == "Alice"

    rejected_ids = {e.get("request_id") for e in server.logs() if e["event"] == "bulkhead.rejected"}
    assert {b["request_id"] for _, b in refused} <= rejected_ids
