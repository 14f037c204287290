"""Benchmark: 200 clients waiting on a finalize job (``GET .../finalize?wait=30``) do not
slow other requests.

Two ``ballast serve`` processes with the same config run side by side, each with a
session whose finalize job hangs in its report stage (the openai provider pointed at the
test suite's fake upstream, told to hang). On one of them (``waiting``), 200 clients hold
``GET /v1/sessions/{id}/finalize?wait=30`` open the whole time, each on its own
connection, re-asking when an answer comes back; the other (``idle``) has none. Each
round measures ``GET /v1/sessions/{other}`` on both servers in turns (``wrk -t1 -c16``,
the order alternating per round) and the CPU each server spent while its 200 waiters
were just waiting.

Reported: throughput and p99 per server, the ratio waiting / idle per round and its
median; the CPU per second of the waiting server with no other traffic.

    python bench/bench_waiters.py [--rounds 5] [--duration 3] [--waiters 200]
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

sys.path.insert(0, str(common.ROOT / "tests"))
from fake_upstream import FakeUpstreamProcess

TARGET_RATIO = 0.9  # waiting / idle throughput


def _prepare(origin: str) -> None:
    """A session to read, and one whose finalize job hangs in its report stage."""
    for sid in ("probe", "held"):
        status, body = common.http_json("POST", f"{origin}/v1/sessions", {
            "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]})
        assert status == 201, body
        status, body = common.http_json("POST", f"{origin}/v1/sessions/{sid}/mutations", {"mutations": [
            {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900, "text": "Hi, I'm Alice."},
            {"type": "utterance", "speaker": "spk_1", "start_ms": 900, "end_ms": 1800, "text": "Bob here."},
            {"type": "speaker_renamed", "speaker": "spk_0", "name": "Alice"},
            {"type": "speaker_renamed", "speaker": "spk_1", "name": "Bob"}]})
        assert status == 200, body
    status, body = common.http_json("POST", f"{origin}/v1/sessions/held/finalize")
    assert status == 202 and body["job"]["state"] == "running", body


class Waiters:
    """``count`` clients long-polling one job, each on its own connection, in a thread."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self.answers: dict[str, int] = {}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> Waiters:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=60)) as http:
            tasks = [asyncio.create_task(self._one(http)) for _ in range(self.count)]
            await asyncio.sleep(1.0)  # every request sent and parked
            self._ready.set()
            await self._stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        while True:
            async with http.get(self.url) as resp:
                body = await resp.json()
                key = f"{resp.status} {body.get('job', {}).get('state')}"
                self.answers[key] = self.answers.get(key, 0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=5, duration=3.0)
    parser.add_argument("--waiters", type=int, default=200)
    args = parser.parse_args(argv)
    info = common.machine()

    with FakeUpstreamProcess(default="hang:3600") as fake, common.WorkDir("waiters") as work:
        env = {"BALLAST__INFERENCE__PROVIDER": "openai", "BALLAST__INFERENCE__BASE_URL": fake.base_url,
               "BALLAST__INFERENCE__MODEL": "m", "BALLAST__INFERENCE__TIMEOUT_MS": "600000",
               "BALLAST__PLUGINS__TIMEOUT_BUDGET__FINALIZE_MS": "3600000",
               "BALLAST__LOGGING__LEVEL": "warning"}
        servers = {name: common.ballast_server(work / f"{name}.db", durability="normal", extra_env=env,
                                               stdout=work / f"{name}.log") for name in ("idle", "waiting")}
        for server in servers.values():
            server.start()
        try:
            for server in servers.values():
                _prepare(server.origin)
            waiting = servers["waiting"]
            with Waiters(f"{waiting.origin}/v1/sessions/held/finalize?wait=30", args.waiters) as waiters:
                # What 200 parked requests cost when nothing else happens.
                before = common.cpu_seconds(waiting.pid)
                time.sleep(2.0)
                idle_cpu_per_s = (common.cpu_seconds(waiting.pid) - before) / 2.0
                rounds: list[dict[str, Any]] = []
                for r in range(args.rounds):
                    order = ["idle", "waiting"] if r % 2 == 0 else ["waiting", "idle"]
                    row: dict[str, Any] = {}
                    for name in order:
                        row[name] = common.wrk(servers[name].origin + "/v1/sessions/probe", connections=16,
                                               duration_s=args.duration)
                    row["ratio"] = row["waiting"]["rps"] / row["idle"]["rps"]
                    rounds.append(row)
                    print(f"round {r + 1}: idle {row['idle']['rps']:.0f} req/s, waiting "
                          f"{row['waiting']['rps']:.0f} req/s, ratio {row['ratio']:.3f}", flush=True)
                answers = dict(waiters.answers)
            status, body = common.http_json("GET", f"{waiting.origin}/v1/sessions/held/finalize")
            assert status == 200 and body["job"]["state"] == "running"
        finally:
            for server in servers.values():
                server.stop()

    ratio = common.median([row["ratio"] for row in rounds])
    result = {
        "machine": info,
        "method": __doc__,
        "waiters": args.waiters,
        "rounds": rounds,
        "waiter_answers_during_run": answers,
        "waiting_server_cpu_s_per_s_with_only_waiters": round(idle_cpu_per_s, 4),
        "median": {
            "idle_rps": common.median([row["idle"]["rps"] for row in rounds]),
            "waiting_rps": common.median([row["waiting"]["rps"] for row in rounds]),
            "idle_p99_ms": common.median([row["idle"]["p99_ms"] for row in rounds]),
            "waiting_p99_ms": common.median([row["waiting"]["p99_ms"] for row in rounds]),
            "ratio": ratio,
        },
        "targets": {"GET session throughput, 200 waiters / none": {
            "target": f">= {TARGET_RATIO}", "measured": round(ratio, 3),
            "result": common.verdict(ratio >= TARGET_RATIO)}},
    }
    return common.finish("waiters", result, args, (
        f"median ratio {ratio:.3f}; waiting server CPU with only waiters "
        f"{idle_cpu_per_s * 1000:.1f} ms/s; answers during the run {answers}"))


if __name__ == "__main__":
    sys.exit(main())
