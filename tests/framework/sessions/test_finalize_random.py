"""Randomized faults around many finalize jobs: the job and its session always agree.

Each round runs the real service on a real SQLite file while, at random moments:
another connection holds the write lock (so store writes fail after a short busy
timeout), starts are cancelled by their caller, budgets run out at random stages, and
the service shuts down mid-job (its jobs hand their leases back). Between rounds the
database is checked against the job state machine's invariant; at the end a clean
service claims what was left, every job ends, and the next finalize of every session
that is not finalized succeeds.

``BALLAST_FAULT_SEED`` replays a failing run (the seed is in the assertion messages).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from ballast.executor import LoopDefaultExecutor
from ballast.plugins.timeout_budget import finalize_budget
from ballast.sessions.builtin import BuiltinProvider
from ballast.sessions.service import SessionService
from ballast.sessions.sqlite_store import SQLiteStore

SEED = int(os.environ.get("BALLAST_FAULT_SEED", random.randrange(1 << 30)))
SESSIONS = [f"s{i}" for i in range(24)]
ROUNDS = 8
TENANT = "default"

EXPECTED = {None: "open", "running": "finalizing", "succeeded": "finalized", "failed": "failed",
            "timed_out": "failed"}


def invariant_violations(path: Path) -> list[str]:
    """Every session whose state contradicts its job (read straight from the file)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT s.session_id, s.state, j.state, r.session_pk IS NOT NULL FROM sessions s"
            " LEFT JOIN jobs j ON j.session_pk = s.pk LEFT JOIN reports r ON r.session_pk = s.pk"
        ).fetchall()
    finally:
        conn.close()
    bad = []
    for sid, state, job_state, has_report in rows:
        if EXPECTED[job_state] != state or has_report != (job_state == "succeeded"):
            bad.append(f"{sid}: session {state}, job {job_state}, report {has_report}")
    return bad


class LockHolder:
    """Takes the write lock from another connection at random moments."""

    def __init__(self, path: Path, rng: random.Random) -> None:
        self._path = path
        self._rng = rng
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockHolder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=5)
        try:
            while not self._stop.wait(self._rng.uniform(0.0, 0.12)):
                conn.execute("BEGIN IMMEDIATE")
                self._stop.wait(self._rng.uniform(0.02, 0.2))
                conn.execute("COMMIT")
        finally:
            conn.close()


async def _open(path: Path, rng: random.Random, budget_ms: int | None) -> tuple[SQLiteStore, SessionService]:
    store = SQLiteStore(path, durability="normal", busy_timeout_ms=40)
    await store.open()
    executor = LoopDefaultExecutor()
    wrappers = [] if budget_ms is None else [finalize_budget(finalize_ms=budget_ms)]
    service = SessionService(store, executor, BuiltinProvider(executor.run), wrappers, lease_s=0.6)
    await service.start()
    return store, service


async def _seed(path: Path) -> None:
    store = SQLiteStore(path, durability="normal")
    await store.open()
    try:
        for sid in SESSIONS:
            await store.create_session(TENANT, sid, None, ["Ann", "Bob"])
            await store.append(TENANT, sid, [
                {"type": "utterance", "speaker": f"spk_{i % 2}", "start_ms": i * 100, "end_ms": i * 100 + 90,
                 "text": f"I'm {'Ann' if i % 2 else 'Bob'}, line {i}."} for i in range(1500)])
    finally:
        await store.close()


async def _poke(service: SessionService, sid: str, rng: random.Random) -> None:
    """A client's finalize: sometimes given up on (cancelled) at a random moment."""
    call = service.start_finalize(TENANT, sid)
    try:
        if rng.random() < 0.4:
            await asyncio.wait_for(call, rng.uniform(0.0, 0.05))
        else:
            await call
    except (TimeoutError, Exception):
        pass


async def _round(path: Path, rng: random.Random) -> None:
    budget = rng.choice([None, 5, 30, 120, 120_000])
    store, service = await _open(path, rng, budget)
    try:
        with LockHolder(path, random.Random(rng.random())):
            for _ in range(rng.randint(4, 12)):
                await _poke(service, rng.choice(SESSIONS), rng)
                await asyncio.sleep(rng.uniform(0.0, 0.03))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
    finally:
        await service.close()  # mid-job, mid-END-retry or idle: whatever the moment is
        await store.close()


async def _settle(path: Path) -> None:
    store, service = await _open(path, random.Random(0), None)
    try:
        for _ in range(400):  # claims happen on start and each sweep
            jobs = [await store.get_job(TENANT, sid) for sid in SESSIONS]
            running = [j for j in jobs if j is not None and j.state == "running"]
            if not running:
                break
            await asyncio.sleep(0.05)
        assert not running, f"seed {SEED}: jobs never ended: {running}"
        assert invariant_violations(path) == [], f"seed {SEED}"
        for sid in SESSIONS:
            view = await service.get(TENANT, sid)
            if view["state"] == "finalized":
                continue
            await service.start_finalize(TENANT, sid)
            for _ in range(400):
                job = await service.get_job(TENANT, sid)
                if job["state"] != "running":
                    break
                await asyncio.sleep(0.02)
            assert job["state"] == "succeeded", f"seed {SEED}: {sid}: {job}"
            assert (await service.get(TENANT, sid))["state"] == "finalized"
    finally:
        await service.close()
        await store.close()
    assert invariant_violations(path) == [], f"seed {SEED}"


@pytest.mark.timeout(180)
def test_random_faults_never_leave_a_job_and_its_session_disagreeing(tmp_path: Path) -> None:
    path = tmp_path / "faults.db"
    rng = random.Random(SEED)

    async def main() -> None:
        await _seed(path)
        for _ in range(ROUNDS):
            await _round(path, rng)
            assert invariant_violations(path) == [], f"seed {SEED}"
        await _settle(path)

    asyncio.run(main())


def test_the_invariant_check_sees_a_contradiction(tmp_path: Path) -> None:
    """The check above can fail: a finalized session whose job says failed is caught."""
    path = tmp_path / "bad.db"
    asyncio.run(_seed(path))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE sessions SET state = 'finalized' WHERE session_id = 's0'")
    conn.execute("INSERT INTO jobs (session_pk, state, attempt, fence, progress)"
                 " SELECT pk, 'failed', 1, 1, '{}' FROM sessions WHERE session_id = 's0'")
    conn.commit()
    conn.close()
    assert invariant_violations(path) == ["s0: session finalized, job failed, report 0"]
