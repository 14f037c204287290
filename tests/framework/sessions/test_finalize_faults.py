"""Finalize jobs under store faults, timeouts and shutdowns, against a real ``ballast serve``.

Each test reproduces one way a job used to be left wedged or contradicting its session
(issue "Finalize jobs that never wedge"), with the real server process, its real SQLite
file and, where a stage must be slow, the fake upstream over HTTP. A store outage is
another connection holding SQLite's write lock (``BEGIN IMMEDIATE``), as a backup tool
or a second writer would; the server's busy timeout is 5 s.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstreamProcess
from support import ServerProcess, request

from ballast.plugins.timeout_budget import WRITE_TIMEOUT_DETAIL

pytestmark = pytest.mark.timeout(120)

BUSY_S = 5.0  # the store's busy timeout: a lock held longer fails the write


@contextmanager
def write_lock(db: Path, hold_s: float) -> Iterator[None]:
    """Hold the database's write lock from a second connection for ``hold_s`` seconds.

    Taken before the block runs and released by a timer, whatever the block does; the
    exit waits for the release.
    """
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        conn.execute("COMMIT")
        conn.close()
        released.set()

    timer = threading.Timer(hold_s, release)
    timer.start()
    try:
        yield
    finally:
        released.wait(hold_s + 5)


def utterances(n: int) -> list[dict[str, Any]]:
    return [{"id": f"u{i}", "type": "utterance", "speaker": f"spk_{i % 2}", "start_ms": i * 1000,
             "end_ms": i * 1000 + 900, "text": f"Line {i}. I'm {'Ann' if i % 2 == 0 else 'Bob'}."}
            for i in range(n)]


def seed(base: str, sid: str) -> None:
    status, _, body = request("POST", f"{base}/v1/sessions",
                              {"session_id": sid, "participants": [{"name": "Ann"}, {"name": "Bob"}]})
    assert status == 201, body
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/mutations", {"mutations": utterances(6)})
    assert status == 200, body


def job_of(base: str, sid: str) -> tuple[int, dict[str, Any] | None]:
    status, _, body = request("GET", f"{base}/v1/sessions/{sid}/finalize")
    return status, (body or {}).get("job") if status == 200 else None


def session_of(base: str, sid: str) -> dict[str, Any]:
    status, _, body = request("GET", f"{base}/v1/sessions/{sid}")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def wait_job(base: str, sid: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job once it is no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = job_of(base, sid)
        if job is not None and job["state"] != "running":
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job still running after {timeout} s: {status} {job}")
        time.sleep(0.1)


def wait_stage(base: str, sid: str, stage: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = job_of(base, sid)
        if job is not None and any(s["name"] == stage and s["state"] == "running" for s in job["stages"]):
            return
        time.sleep(0.02)
    raise AssertionError(f"stage {stage} never ran")


def assert_agree(base: str, sid: str) -> dict[str, Any]:
    """The session's state and its job's agree, and the report exists exactly on success."""
    view = session_of(base, sid)
    job = view["finalize"]
    expected = {"succeeded": "finalized", "failed": "failed", "timed_out": "failed", "running": "finalizing"}
    assert job is not None and view["state"] == expected[job["state"]], view
    report_status = request("GET", f"{base}/v1/sessions/{sid}/report")[0]
    assert report_status == (200 if job["state"] == "succeeded" else 404), view
    return view


def openai_config(fake: FakeUpstreamProcess, extra: str = "") -> str:
    return (f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
            f'timeout_ms = 20000\n{extra}')


# ---------------------------------------------------------------------- 1. phantom jobs


def test_a_finalize_that_times_out_waiting_for_the_store_leaves_no_phantom_job(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "[plugins.timeout_budget]\nrequest_ms = 300\n") as server:
        base = server.base_url
        seed(base, "s")
        with write_lock(server.db, 1.0):
            status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
            assert status == 504, body
            assert body["detail"] == WRITE_TIMEOUT_DETAIL
        # The start went through once the lock was released, and its job really runs.
        job = wait_job(base, "s")
        assert job["state"] == "succeeded", job
        assert [s["state"] for s in job["stages"]] == ["succeeded"] * 8
        status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
        assert status == 202 and body["job"]["state"] == "succeeded" and body["job"]["attempt"] == 1
        assert assert_agree(base, "s")["state"] == "finalized"


def test_a_finalize_the_store_refuses_leaves_nothing_behind(tmp_path: Path) -> None:
    with ServerProcess(tmp_path) as server:
        base = server.base_url
        seed(base, "s")
        with write_lock(server.db, BUSY_S + 1.5):
            status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
            assert status == 500, body
        assert job_of(base, "s") == (404, None)
        assert session_of(base, "s")["state"] == "open"
        status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
        assert status == 202 and body["job"]["attempt"] == 1
        assert wait_job(base, "s")["state"] == "succeeded"
        assert_agree(base, "s")


# ---------------------------------------------------------------------- 2. outage at the end


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_store_outage_across_the_jobs_end_does_not_wedge_the_session(tmp_path: Path, outcome: str) -> None:
    with FakeUpstreamProcess() as fake:
        if outcome == "succeeded":
            fake.script("hang:1")  # the report answers while the store is locked
            config = openai_config(fake)
        else:
            fake.script("hang:30")  # times out while the store is locked: the job fails
            config = openai_config(fake).replace("timeout_ms = 20000", "timeout_ms = 1500")
            config += "[plugins.retry]\nenabled = false\n"
        with ServerProcess(tmp_path, config) as server:
            base = server.base_url
            seed(base, "s")
            assert request("POST", f"{base}/v1/sessions/s/finalize")[0] == 202
            wait_stage(base, "s", "report")
            with write_lock(server.db, BUSY_S + 3.0):
                time.sleep(BUSY_S + 1.0)  # the END write has failed at least once by now
                # Meanwhile the server answers honestly: the job has not ended in the store.
                status, job = job_of(base, "s")
                assert status == 200 and job is not None and job["state"] == "running"
                status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
                assert status == 202 and body["job"]["attempt"] == 1
                assert request("POST", f"{base}/v1/sessions/s/mutations",
                               {"mutations": [{"type": "note", "text": "late"}]})[0] == 409
            job = wait_job(base, "s")
            assert job["state"] == outcome, job
            assert_agree(base, "s")
            retries = [e for e in server.logs() if e.get("event") == "finalize.end_retry"]
            assert retries and retries[0]["state"] == outcome
            if outcome == "failed":
                fake.set_default("ok")
                status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
                assert status == 202 and body["job"]["attempt"] == 2
                assert wait_job(base, "s")["state"] == "succeeded"
                assert_agree(base, "s")


# ---------------------------------------------------------------------- 4. persist


def test_a_budget_that_runs_out_during_persist_cannot_contradict_the_session(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake:
        fake.script("hang:1")
        config = openai_config(fake, "[plugins.timeout_budget]\nfinalize_ms = 2500\n")
        with ServerProcess(tmp_path, config) as server:
            base = server.base_url
            seed(base, "s")
            status, _, body = request("POST", f"{base}/v1/sessions/s/finalize")
            assert status == 202 and body["job"]["budget_ms"] == 2500  # the first 202 has it
            wait_stage(base, "s", "report")
            with write_lock(server.db, BUSY_S + 1.0):
                pass  # the report is ready at 1 s; persist waits past the 2.5 s budget
            job = wait_job(base, "s")
            # The outcome was decided within the budget; writing it is not cut short.
            assert job["state"] == "succeeded", job
            assert_agree(base, "s")


def test_a_shutdown_during_persist_is_carried_to_an_end_by_the_next_process(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake:
        fake.script("hang:1")
        server = ServerProcess(tmp_path, openai_config(fake), env={"BALLAST__STORAGE__JOB_LEASE_S": "2"})
        server.start()
        try:
            base = server.base_url
            seed(base, "s")
            assert request("POST", f"{base}/v1/sessions/s/finalize")[0] == 202
            wait_stage(base, "s", "report")
            with write_lock(server.db, BUSY_S + 1.0):
                time.sleep(1.5)  # the report is done; the END write waits for the lock
                assert server.stop(signal.SIGTERM, timeout=30) == 0
            server.start()
            job = wait_job(base, "s")
            assert job["state"] == "succeeded", job
            assert_agree(base, "s")
        finally:
            server.kill()


# ---------------------------------------------------------------------- 5. the 504 detail


def test_a_504_after_a_possible_commit_says_so_and_the_retry_is_safe(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, "[plugins.timeout_budget]\nrequest_ms = 300\n") as server:
        base = server.base_url
        assert request("POST", f"{base}/v1/sessions", {"session_id": "s"})[0] == 201
        batch = {"mutations": [{"id": f"n{i}", "type": "note", "text": f"note {i}"} for i in range(3)]}
        with write_lock(server.db, 1.0):
            status, _, body = request("POST", f"{base}/v1/sessions/s/mutations", batch)
            assert status == 504, body
            assert "may still have been stored" in body["detail"] and "same ids" in body["detail"]
        # The batch committed after the 504; the retry with the same ids is not applied twice.
        status, _, body = request("POST", f"{base}/v1/sessions/s/mutations", batch)
        assert status == 200, body
        assert [(a["seq"], a["duplicate"]) for a in body["accepted"]] == [(1, True), (2, True), (3, True)]
        status, _, page = request("GET", f"{base}/v1/sessions/s/mutations")
        assert [m["id"] for m in page["mutations"]] == ["n0", "n1", "n2"]
