"""Two ``ballast serve`` processes on one PostgreSQL database, one of them SIGKILLed.

The set test of test_crash_durability.py, scaled out: servers A and B share a fresh
PostgreSQL database; 8 writers stream batches of mutations with unique ids, half of
them through A and half through B. A is SIGKILLed three times under load and started
again. A writer whose request fails sends the same batch again through the OTHER
server (the ids make that safe), as a client behind a load balancer would.

Checked at the end, from B: every acknowledged mutation stored exactly once, nothing
stored that was never sent, seqs gapless per session and equal to the acknowledged
ones, and no retried batch came back torn.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from fake_upstream import FakeUpstreamProcess
from reliability_support import API_KEY_ENV, Client, openai_config, report, utterance
from support import ServerProcess

pytestmark = pytest.mark.reliability

SESSIONS = [f"pg-{i}" for i in range(4)]
WRITERS = 8
KILLS = 3
MIN_ACKED = 2000


def pg_env(url: str, **extra: str) -> dict[str, str]:
    """The environment that points a ``ballast serve`` at the test's database."""
    return {"BALLAST__STORAGE__BACKEND": "postgres", "BALLAST__STORAGE__URL": url,
            "BALLAST__STORAGE__POOL_SIZE": "4", **extra}


@dataclass
class History:
    sent: dict[str, str] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    order: dict[tuple[int, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    failed_requests: int = 0
    failovers: int = 0
    torn: int = 0
    bad_answers: list[str] = field(default_factory=list)


async def _writer(n: int, urls: list[str], history: History, stop: asyncio.Event) -> None:
    rng = random.Random(n)
    home = n % 2  # writers 0, 2, 4, 6 start on A; the others on B
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        i = 0
        while not stop.is_set():
            sid = rng.choice(SESSIONS)
            ids = [f"w{n}-{i + j}" for j in range(rng.randint(1, 5))]
            i += len(ids)
            for mid in ids:
                history.sent[mid] = sid
            batch = {"mutations": [{"id": mid, "type": "note", "text": mid} for mid in ids]}
            target, tries = home, 0
            while True:
                tries += 1
                try:
                    async with http.post(f"{urls[target]}/v1/sessions/{sid}/mutations", json=batch) as resp:
                        status = resp.status
                        body: Any = await resp.json(content_type=None)
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    history.failed_requests += 1
                    target = 1 - target  # fail over to the other server
                    history.failovers += 1
                    await asyncio.sleep(0.01)
                    continue
                if status != 200:
                    history.bad_answers.append(f"{status}: {body}")
                    await asyncio.sleep(0.05)
                    continue
                break
            accepted = body["accepted"]
            dup = [a["duplicate"] for a in accepted]
            if tries > 1 and any(dup) and not all(dup):
                history.torn += 1
            if tries == 1 and any(dup):
                history.bad_answers.append(f"first send of {ids} reported duplicates")
            for a in accepted:
                history.acked[a["id"]] = a["seq"]
                history.order[(n, sid)].append(a["seq"])


@pytest.mark.timeout(300)
def test_two_servers_one_database_survive_kills_of_one(tmp_path: Path, pg_url: str) -> None:
    a, b = (ServerProcess(tmp_path / name, env=pg_env(pg_url)) for name in ("a", "b"))
    history = History()
    restarts: list[float] = []

    async def run() -> None:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        client = Client(a.base_url)
        for sid in SESSIONS:
            status, _, body = await asyncio.to_thread(
                client.call, "POST", "/v1/sessions", {"session_id": sid})
            assert status == 201, body
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_writer(n, [a.base_url, b.base_url], history, stop))
                 for n in range(WRITERS)]
        rng = random.Random(7)
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                assert a.proc is not None and a.proc.poll() is None, "server A died on its own"
                os.kill(a.proc.pid, signal.SIGKILL)
                a.proc.wait()
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                t0 = time.monotonic()
                await asyncio.to_thread(a.start, 30.0)
                restarts.append(time.monotonic() - t0)
            deadline = time.monotonic() + 60
            while len(history.acked) < MIN_ACKED and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)

    try:
        asyncio.run(run())
        reader = Client(b.base_url)
        stored = {sid: reader.all_mutations(sid) for sid in SESSIONS}
        views = {sid: reader.session(sid) for sid in SESSIONS}
    finally:
        codes = [s.stop() if s.proc is not None and s.proc.poll() is None else None for s in (a, b)]

    where = {row["id"]: (sid, row["seq"]) for sid, rows in stored.items() for row in rows}
    stored_ids = [row["id"] for rows in stored.values() for row in rows]
    lost = sorted(set(history.acked) - set(where))
    duplicated = len(stored_ids) - len(set(stored_ids))
    unexpected = sorted(set(where) - set(history.sent))
    seq_disagrees = [m for m, seq in history.acked.items() if m in where and where[m][1] != seq]
    reordered = sum(1 for seqs in history.order.values() for x, y in itertools.pairwise(seqs)
                    if not x < y)
    gaps = [sid for sid, rows in stored.items() if [r["seq"] for r in rows] != list(range(1, len(rows) + 1))]
    counts_off = [sid for sid, v in views.items() if v["last_seq"] != len(stored[sid])]
    report(f"PostgreSQL, two servers, server A SIGKILLed {KILLS} times, {WRITERS} writers", [
        f"sent={len(history.sent)} acknowledged={len(history.acked)} stored={len(stored_ids)}",
        f"lost={len(lost)} duplicated={duplicated} unexpected={len(unexpected)} reordered={reordered} "
        f"torn={history.torn} seq mismatches={len(seq_disagrees)} gaps={len(gaps)}",
        f"requests cut by kills={history.failed_requests} failovers to the other server={history.failovers}",
        "A restart to ready (s): " + ", ".join(f"{s:.2f}" for s in restarts),
        f"final SIGTERM exit codes={codes}",
    ])
    assert not history.bad_answers, history.bad_answers[:5]
    assert len(history.acked) >= MIN_ACKED
    assert history.failed_requests > 0, "no request was cut by a kill: the kills hit idle time"
    assert (lost, duplicated, unexpected) == ([], 0, [])
    assert not seq_disagrees and reordered == 0 and history.torn == 0
    assert not gaps and not counts_off
    assert codes == [0, 0]


@pytest.mark.timeout(180)
def test_a_finalize_job_whose_owner_dies_is_finished_by_the_other_server(
        tmp_path: Path, pg_url: str) -> None:
    """A runs a job, hung in its report stage; A is SIGKILLed; B takes the job over."""
    lease_s = 2.0
    with FakeUpstreamProcess(script=["hang:60"]) as fake:
        config = openai_config(fake.base_url, timeout_ms=60_000, finalize_ms=90_000, request_ms=60_000)
        env = pg_env(pg_url, BALLAST__STORAGE__JOB_LEASE_S=str(lease_s),
                     **{API_KEY_ENV: "sk-test-takeover"})
        a = ServerProcess(tmp_path / "a", config=config, env=env)
        b = ServerProcess(tmp_path / "b", config=config, env=env)
        try:
            a.start()
            b.start()
            client_a, client_b = Client(a.base_url), Client(b.base_url)
            status, _, body = client_a.call("POST", "/v1/sessions", {
                "session_id": "meet", "participants": [{"name": "Ann"}, {"name": "Bob"}]})
            assert status == 201, body
            status, _, body = client_b.call("POST", "/v1/sessions/meet/mutations", {"mutations": [
                utterance(i, i % 2, f"line {i}", f"u{i}") for i in range(40)]})
            assert status == 200, body
            status, _, body = client_a.call("POST", "/v1/sessions/meet/finalize")
            assert status == 202, body
            # The report stage is running on A: its one upstream request hangs.
            deadline = time.monotonic() + 20
            while fake.attempts < 1:
                assert time.monotonic() < deadline, "the report stage never called the upstream"
                time.sleep(0.05)
            status, _, body = client_b.call("GET", "/v1/sessions/meet/finalize")
            assert body["job"]["state"] == "running"
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            killed_at = time.monotonic()
            job = client_b.poll_job("meet", within=lease_s + 30)
            took = time.monotonic() - killed_at
            session = client_b.session("meet")
            status, _, report_body = client_b.call("GET", "/v1/sessions/meet/report")
            takeovers = [line for line in b.logs() if line.get("event") == "finalize.taken_over"]
        finally:
            codes = [s.stop() if s.proc is not None and s.proc.poll() is None else None for s in (a, b)]

    report_line = f"job taken over by B and finished {took:.2f}s after A was killed (lease {lease_s}s)"
    report("PostgreSQL, finalize owner SIGKILLed mid-stage", [report_line, f"job={job}"])
    assert job["state"] == "succeeded", job
    assert [s["state"] for s in job["stages"]] == ["succeeded"] * len(job["stages"])
    assert session["state"] == "finalized" and session["finalize"]["state"] == "succeeded"
    assert status == 200 and report_body["session_id"] == "meet"
    assert len(takeovers) == 1
    assert took < lease_s + 20
    assert codes[1] == 0

    async def rows() -> tuple[int, int, int]:
        conn = await asyncpg.connect(pg_url)
        try:
            return (await conn.fetchval("SELECT count(*) FROM reports"),
                    await conn.fetchval("SELECT count(*) FROM jobs"),
                    await conn.fetchval("SELECT count(*) FROM mutations"))
        finally:
            await conn.close()

    # Each stage's result written once: one report, one job record, the log untouched.
    assert asyncio.run(rows()) == (1, 1, 40)
