"""Overload: flood a real server far past its capacity and watch it hold.

The server runs with a tiny bulkhead (``max_workers = 2``, ``max_queue = 4``). A bounded
load generator on loopback keeps ``CONNECTIONS`` requests in flight for ``FLOOD_S``
seconds: mutation batches, finalize starts, speaker resolutions and reads. While it
does, the server's resident memory is sampled from ``/proc``. The server must keep
answering: every non-2xx is a 503 problem with ``Retry-After`` (load shed by the
bulkhead), never a 500, never a dropped connection; its memory stays bounded; and once
the flood stops it serves a normal session end to end within a few seconds.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from reliability_support import (
    INTRODUCTIONS,
    Client,
    report,
    rss_mb,
    scale,
    threads_of,
    utterance,
)
from support import ServerProcess

pytestmark = pytest.mark.reliability

CONNECTIONS = scale(300, 1000)
FLOOD_S = scale(10, 30)
RSS_LIMIT_MB = 400
RECOVERY_S = 5.0
OPEN_SESSIONS = [f"live-{i}" for i in range(20)]
FINALIZE_SESSIONS = [f"done-{i}" for i in range(scale(150, 400))]

CONFIG = """
[plugins.bulkhead]
max_workers = 2
max_queue = 4
retry_after_s = 1
"""


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    shed_without_retry_after: int = 0
    not_problem: list[str] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latencies_ok: list[float] = field(default_factory=list)
    requests: int = 0


class Sampler(threading.Thread):
    """Samples the server's VmRSS and thread count every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss: list[float] = []
        self.threads: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            rss, threads = rss_mb(self.pid), threads_of(self.pid)
            if rss is not None:
                self.rss.append(rss)
            if threads is not None:
                self.threads.append(threads)
            self.halt.wait(0.1)


def _prepare(client: Client) -> None:
    for sid in OPEN_SESSIONS + FINALIZE_SESSIONS:
        status, _, body = client.call("POST", "/v1/sessions", {
            "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}, {"name": "Carol"}]})
        assert status == 201, body
        batch = [utterance(i, i, INTRODUCTIONS[i]) for i in range(3)]
        batch += [utterance(3 + i, i % 3, f"item {i} on the agenda") for i in range(20)]
        status, _, body = client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": batch})
        assert status == 200, body


def _pick(rng: random.Random, worker: int, i: int) -> tuple[str, str, Any]:
    roll = rng.random()
    if roll < 0.55:
        sid = rng.choice(OPEN_SESSIONS)
        batch = [{"id": f"w{worker}-{i}-{j}", "type": "note", "text": f"flood {worker} {i} {j}"}
                 for j in range(rng.randint(1, 20))]
        return "mutations", f"/v1/sessions/{sid}/mutations", {"mutations": batch}
    if roll < 0.75:
        return "finalize", f"/v1/sessions/{rng.choice(FINALIZE_SESSIONS)}/finalize", None
    if roll < 0.90:
        return "resolve", f"/v1/sessions/{rng.choice(OPEN_SESSIONS)}/resolve", None
    return "read", f"/v1/sessions/{rng.choice(OPEN_SESSIONS)}", None


async def _worker(n: int, http: aiohttp.ClientSession, base: str, until: float, tally: Tally) -> None:
    rng = random.Random(n)
    i = 0
    while time.monotonic() < until:
        i += 1
        kind, path, body = _pick(rng, n, i)
        method = "GET" if kind == "read" else "POST"
        started = time.monotonic()
        tally.requests += 1
        try:
            async with http.request(method, base + path, json=body) as resp:
                payload = await resp.read()
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            tally.transport_errors[type(exc).__name__] += 1
            continue
        tally.statuses[(kind, status)] += 1
        if status < 300:
            tally.latencies_ok.append(time.monotonic() - started)
            continue
        if not ctype.startswith("application/problem+json"):
            tally.not_problem.append(f"{kind} {status} {ctype} {payload[:200]!r}")
        if status == 503 and not retry_after:
            tally.shed_without_retry_after += 1


async def _flood(base: str, tally: Tally) -> None:
    connector = aiohttp.TCPConnector(limit=CONNECTIONS, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        until = time.monotonic() + FLOOD_S
        await asyncio.gather(*(_worker(n, http, base, until, tally) for n in range(CONNECTIONS)))


def _recovered_within(client: Client, limit_s: float) -> float:
    """Seconds until a fresh session works end to end (create, write, resolve, finalize)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        sid = f"after-{attempt}"
        try:
            ok = client.call("POST", "/v1/sessions", {
                "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]}, timeout=5)[0] == 201
            ok = ok and client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": [
                utterance(0, 0, INTRODUCTIONS[0]), utterance(1, 1, INTRODUCTIONS[1])]}, timeout=5)[0] == 200
            status, _, body = client.call("POST", f"/v1/sessions/{sid}/resolve", timeout=5)
            ok = ok and status == 200 and body["speakers"] == {"spk_0": "Alice", "spk_1": "Bob"}
            ok = ok and client.call("POST", f"/v1/sessions/{sid}/finalize", timeout=5)[0] == 202
            ok = ok and client.poll_job(sid, within=limit_s)["state"] == "succeeded"
        except (OSError, AssertionError):
            ok = False
        elapsed = time.monotonic() - started
        if ok:
            return elapsed
        if elapsed > limit_s:
            raise AssertionError(f"the server did not serve normally within {limit_s}s of the flood")
        time.sleep(0.1)


def _settled_job_state(client: Client, sid: str) -> str:
    """The job's state once it has ended (every job must end); 'none' if never started."""
    status, _, body = client.call("GET", f"/v1/sessions/{sid}/finalize")
    if status == 404:
        return "none"
    assert status == 200, body
    return str(client.poll_job(sid, within=30)["state"])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.timeout(scale(180, 600))
def test_flood_is_shed_not_fatal(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, config=CONFIG)
    with server:
        assert server.proc is not None
        pid = server.proc.pid
        client = Client(server.base_url)
        _prepare(client)
        idle_rss = rss_mb(pid) or 0.0
        sampler = Sampler(pid)
        sampler.start()
        tally = Tally()
        flood_started = time.monotonic()
        try:
            asyncio.run(_flood(server.base_url, tally))
        finally:
            sampler.halt.set()
            sampler.join()
        flood_s = time.monotonic() - flood_started
        recovery_s = _recovered_within(client, RECOVERY_S)
        time.sleep(1.0)
        after_rss = rss_mb(pid) or 0.0
        jobs = Counter(_settled_job_state(client, sid) for sid in FINALIZE_SESSIONS)
        logs = server.logs()
        unexpected = [ln for ln in logs if ln.get("event") == "error.unhandled" and ln.get("status") == 500]
        logged_5xx = Counter(ln.get("error_type") for ln in logs if ln.get("event") == "error.unhandled")
        shed_logged = sum(1 for ln in logs if ln.get("event") == "bulkhead.rejected")
        assert server.proc.poll() is None, "the server died under the flood"

    by_status: Counter[int] = Counter()
    for (_, status), n in tally.statuses.items():
        by_status[status] += n
    answered = sum(by_status.values())
    peak_rss = max(sampler.rss, default=0.0)
    report(f"overload: {CONNECTIONS} connections for {FLOOD_S} s, bulkhead max_workers=2 max_queue=4", [
        f"requests={tally.requests} answered={answered} ({answered / flood_s:.0f}/s) "
        f"transport errors={dict(tally.transport_errors)}",
        "statuses: " + ", ".join(f"{s}={n}" for s, n in sorted(by_status.items())),
        "by kind: " + ", ".join(f"{k}/{s}={n}" for (k, s), n in sorted(tally.statuses.items())),
        f"2xx latency p50={_percentile(tally.latencies_ok, 0.5) * 1000:.0f} ms "
        f"p99={_percentile(tally.latencies_ok, 0.99) * 1000:.0f} ms",
        f"server RSS idle={idle_rss:.1f} MB, peak during flood={peak_rss:.1f} MB, "
        f"1 s after={after_rss:.1f} MB; threads peak={max(sampler.threads, default=0)}",
        f"bulkhead.rejected lines={shed_logged}; error.unhandled lines by type={dict(logged_5xx)}",
        f"finalize jobs after the flood: {dict(jobs)}; normal service again after {recovery_s:.2f} s",
    ])
    assert not tally.transport_errors, f"connections failed: {dict(tally.transport_errors)}"
    assert set(by_status) <= {200, 202, 503}, by_status
    assert by_status[503] > 0, "nothing was shed: the flood did not exceed capacity"
    assert tally.shed_without_retry_after == 0
    assert not tally.not_problem, tally.not_problem[:3]
    assert not unexpected, unexpected[:3]
    assert set(jobs) <= {"succeeded", "failed", "timed_out", "none"}, jobs  # none: never picked
    assert peak_rss < RSS_LIMIT_MB and after_rss < RSS_LIMIT_MB
    assert recovery_s < RECOVERY_S
