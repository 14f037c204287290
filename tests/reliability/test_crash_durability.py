"""Crash durability, as a Jepsen-style set test.

Concurrent clients stream mutations with unique ids into several sessions of a real
``ballast serve`` (SQLite, ``durability = "full"``) while the server is SIGKILLed at
random moments and restarted on the same database file. A client whose request fails
(the connection died with the server) either waits for the server to come back and
sends the same batch again, as a real client would (the ids make the retry safe), or,
for half of the clients, gives up on it: that batch is indeterminate, and may or may
not be stored.

At the end, the stored log of every session is read back and compared with what the
clients sent and what the server acknowledged:

* lost: acknowledged (a 200) but missing;
* duplicated: the same id stored more than once;
* unexpected: stored but never sent;
* reordered: two mutations acknowledged one after the other by the same client to the
  same session whose seqs are in the opposite order;
* torn: a retried batch that came back part new, part duplicate (a batch is atomic).

All must be 0. Sequence numbers must be gapless and agree with every acknowledgement.
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
import pytest
from fake_upstream import FakeUpstreamProcess
from reliability_support import HEAVY, Client, report, scale
from support import ServerProcess

pytestmark = pytest.mark.reliability

SESSIONS = [f"set-{i}" for i in range(scale(4, 8))]
CLIENTS = scale(16, 32)
KILLS = scale(3, 12)
MIN_ACKED = scale(3000, 20000)


@dataclass
class History:
    """What the clients sent and what the server acknowledged."""

    sent: dict[str, str] = field(default_factory=dict)  # mutation id -> session
    acked: dict[str, int] = field(default_factory=dict)  # mutation id -> acknowledged seq
    #: Per (client, session): acknowledged (id, seq) in acknowledgement order.
    order: dict[tuple[int, str], list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    requests: int = 0
    failed_requests: int = 0
    retried_batches: int = 0
    abandoned_batches: int = 0
    retried_found_committed: int = 0  # in flight at a kill, committed without an ack
    torn: int = 0
    bad_answers: list[str] = field(default_factory=list)


class Cluster:
    """The server under test, killed and restarted on the same files and port."""

    def __init__(self, workdir: Path) -> None:
        self.server = ServerProcess(workdir)
        self.up = asyncio.Event()
        self.kill_times: list[float] = []
        self.restart_s: list[float] = []

    async def start(self) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self.server.start, 30.0)
        self.restart_s.append(time.monotonic() - started)
        self.up.set()

    def kill(self) -> None:
        proc = self.server.proc
        assert proc is not None and proc.poll() is None, "the server died on its own"
        self.up.clear()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.kill_times.append(time.monotonic())


async def _client(n: int, cluster: Cluster, history: History, stop: asyncio.Event) -> None:
    rng = random.Random(n)
    base = cluster.server.base_url
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        i = 0
        while not stop.is_set():
            sid = rng.choice(SESSIONS)
            ids = [f"c{n}-{i + j}" for j in range(rng.randint(1, 6))]
            i += len(ids)
            for mid in ids:
                history.sent[mid] = sid
            batch = {"mutations": [{"id": mid, "type": "note", "text": f"{mid} says hello"} for mid in ids]}
            tries = 0
            while True:
                tries += 1
                await cluster.up.wait()
                history.requests += 1
                try:
                    async with http.post(f"{base}/v1/sessions/{sid}/mutations", json=batch) as resp:
                        status = resp.status
                        body: Any = await resp.json(content_type=None)
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    history.failed_requests += 1
                    if n % 2:  # odd clients give up: the batch stays indeterminate
                        history.abandoned_batches += 1
                        body = None
                        break
                    await asyncio.sleep(0.02)
                    continue
                if status != 200:
                    history.bad_answers.append(f"{status}: {body}")
                    history.failed_requests += 1
                    await asyncio.sleep(0.05)
                    continue
                break
            if body is None:
                continue
            accepted = body["accepted"]
            if [a["id"] for a in accepted] != ids:
                history.bad_answers.append(f"accepted ids {accepted} for {ids}")
            dup = [a["duplicate"] for a in accepted]
            if tries > 1:
                history.retried_batches += 1
                if all(dup):
                    history.retried_found_committed += 1
                elif any(dup):
                    history.torn += 1
            elif any(dup):
                history.bad_answers.append(f"first send of {ids} reported duplicates: {accepted}")
            for a in accepted:
                history.acked[a["id"]] = a["seq"]
                history.order[(n, sid)].append((a["id"], a["seq"]))


async def _run(cluster: Cluster, history: History) -> None:
    rng = random.Random(20240917)
    await cluster.start()
    client = Client(cluster.server.base_url)
    for sid in SESSIONS:
        status, _, body = await asyncio.to_thread(client.call, "POST", "/v1/sessions", {"session_id": sid})
        assert status == 201, body
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_client(n, cluster, history, stop)) for n in range(CLIENTS)]
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.3, 1.5))  # a random moment under load
            cluster.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await cluster.start()
        # Keep the load on until enough was acknowledged to mean something.
        deadline = time.monotonic() + scale(30, 120)
        while len(history.acked) < MIN_ACKED and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
    assert not pending, "clients did not finish their last batch within 60 s"


@pytest.mark.timeout(scale(240, 900))
def test_no_acknowledged_mutation_is_lost_across_kill_9(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    history = History()
    try:
        asyncio.run(_run(cluster, history))
        client = Client(cluster.server.base_url)
        stored: dict[str, list[dict[str, Any]]] = {sid: client.all_mutations(sid) for sid in SESSIONS}
        views = {sid: client.session(sid) for sid in SESSIONS}
    finally:
        if cluster.server.proc is not None and cluster.server.proc.poll() is None:
            exit_code = cluster.server.stop()
        else:
            exit_code = None

    stored_ids = [row["id"] for rows in stored.values() for row in rows]
    where = {row["id"]: (sid, row["seq"]) for sid, rows in stored.items() for row in rows}
    lost = sorted(set(history.acked) - set(where))
    duplicated = len(stored_ids) - len(set(stored_ids))
    unexpected = sorted(set(where) - set(history.sent))
    misplaced = sorted(m for m, (sid, _) in where.items() if history.sent.get(m, sid) != sid)
    seq_disagrees = sorted(m for m, seq in history.acked.items() if m in where and where[m][1] != seq)
    reordered = 0
    for acks in history.order.values():
        seqs = [seq for _, seq in acks]
        reordered += sum(1 for a, b in itertools.pairwise(seqs) if not a < b)
    gaps = {sid: [r["seq"] for r in rows] != list(range(1, len(rows) + 1)) for sid, rows in stored.items()}
    counts_off = {sid: (v["mutation_count"], v["last_seq"]) != (len(stored[sid]), len(stored[sid]))
                  for sid, v in views.items()}
    indeterminate = set(history.sent) - set(history.acked)
    indeterminate_stored = len(indeterminate & set(where))

    report(f"crash durability (set test): {KILLS} x SIGKILL, {CLIENTS} clients, {len(SESSIONS)} sessions", [
        f"mutations sent={len(history.sent)} acknowledged={len(history.acked)} "
        f"stored={len(stored_ids)} never acknowledged={len(indeterminate)} "
        f"(of which stored: {indeterminate_stored})",
        f"lost={len(lost)} duplicated={duplicated} unexpected={len(unexpected)} "
        f"reordered={reordered} torn batches={history.torn} seq mismatches={len(seq_disagrees)}",
        f"requests={history.requests} failed by the kills={history.failed_requests} "
        f"batches retried={history.retried_batches} "
        f"(of which committed before the kill, without an ack: {history.retried_found_committed}) "
        f"batches abandoned={history.abandoned_batches}",
        "restart to ready (s): " + ", ".join(f"{s:.2f}" for s in cluster.restart_s[1:]),
        f"heavy={HEAVY} final SIGTERM exit code={exit_code}",
    ])
    assert not history.bad_answers, history.bad_answers[:5]
    assert len(cluster.kill_times) == KILLS
    assert len(history.acked) >= MIN_ACKED, "the load was too light to mean anything"
    assert history.failed_requests > 0, "no request was ever cut by a kill: the kills hit idle time"
    assert (len(lost), duplicated, len(unexpected)) == (0, 0, 0), (lost[:10], unexpected[:10])
    assert not misplaced, misplaced[:10]
    assert reordered == 0
    assert history.torn == 0
    assert not seq_disagrees, seq_disagrees[:10]
    assert not any(gaps.values()), gaps
    assert not any(counts_off.values()), views
    assert exit_code == 0


# ---------------------------------------------------------------------- finalize jobs

JOB_SESSIONS = [f"job-{i}" for i in range(scale(12, 40))]
JOB_KILLS = scale(3, 8)
JOB_LEASE_S = 1
_END = {"succeeded": "finalized", "failed": "failed", "timed_out": "failed", "running": "finalizing"}


def _job_of(client: Client, sid: str) -> dict[str, Any] | None:
    status, _, body = client.call("GET", f"/v1/sessions/{sid}/finalize")
    return body["job"] if status == 200 else None


@pytest.mark.timeout(scale(240, 900))
def test_finalize_jobs_cut_by_kill_9_are_taken_over_and_end_consistently(tmp_path: Path) -> None:
    """Jobs running when the server is SIGKILLed are claimed by the next process once
    their lease expires and carried to an end; no session is left ``finalizing``, and
    every session's state agrees with its job's."""
    rng = random.Random(int(os.environ.get("BALLAST_FAULT_SEED", "20")))
    with FakeUpstreamProcess(default="hang:0.4") as fake:  # each report takes a while
        config = f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
        server = ServerProcess(tmp_path, config, env={"BALLAST__STORAGE__JOB_LEASE_S": str(JOB_LEASE_S)})
        server.start()
        client = Client(server.base_url)
        cut = 0
        try:
            for sid in JOB_SESSIONS:
                assert client.call("POST", "/v1/sessions", {"session_id": sid})[0] == 201
                rows = [{"type": "utterance", "speaker": f"spk_{i % 2}", "start_ms": i * 100,
                         "end_ms": i * 100 + 90, "text": f"line {i}"} for i in range(200)]
                assert client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": rows})[0] == 200
            for _ in range(JOB_KILLS):
                for sid in rng.sample(JOB_SESSIONS, len(JOB_SESSIONS) // 2):
                    client.call("POST", f"/v1/sessions/{sid}/finalize")
                time.sleep(rng.uniform(0.1, 0.6))
                cut += sum(1 for sid in JOB_SESSIONS
                           if (_job_of(client, sid) or {}).get("state") == "running")
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                server.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = {sid: _job_of(client, sid) for sid in JOB_SESSIONS}
                if not any(j is not None and j["state"] == "running" for j in jobs.values()):
                    break
                time.sleep(0.2)
            disagree = []
            for sid in JOB_SESSIONS:
                view = client.session(sid)
                job = view["finalize"]
                want = "open" if job is None else _END[job["state"]]
                if view["state"] != want:
                    disagree.append((sid, view["state"], job and job["state"]))
            fake.set_default("ok")
            finished = 0
            for sid in JOB_SESSIONS:
                if client.call("GET", f"/v1/sessions/{sid}")[2]["state"] != "finalized":
                    assert client.call("POST", f"/v1/sessions/{sid}/finalize")[0] == 202
                    finished += 1
            for _ in range(300):
                states = {sid: (_job_of(client, sid) or {}).get("state") for sid in JOB_SESSIONS}
                if all(s == "succeeded" for s in states.values()):
                    break
                time.sleep(0.1)
            taken_over = sum(1 for e in server.logs() if e.get("event") == "finalize.taken_over")
        finally:
            exit_code = server.stop() if server.proc is not None and server.proc.poll() is None else None

    report(f"finalize across kill -9: {JOB_KILLS} x SIGKILL, {len(JOB_SESSIONS)} sessions, "
           f"lease {JOB_LEASE_S} s", [
        f"jobs running at a kill={cut} taken over={taken_over} disagreeing={len(disagree)} "
        f"finalized afterwards={finished}",
    ])
    assert cut > 0, "no job was running at any kill: the kills hit idle time"
    assert taken_over > 0
    assert not disagree, disagree
    assert all(s == "succeeded" for s in states.values()), states
    assert exit_code == 0
