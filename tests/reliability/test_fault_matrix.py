"""Fault matrix: every way an inference upstream fails, against a real server.

One ``ballast serve`` with the openai provider points at a fake upstream over loopback.
For each fault, played as the fake's persistent default, the test runs speaker
resolution and a finalize job and records what the client saw and how many attempts the
fake counted per logical call. Retried faults must use exactly ``attempts`` (3), the
others exactly one; resolve must fail with the documented 502 problem; the finalize job
must reach an end state; after the fault clears, the same session resolves and
finalizes normally. Every response body is scanned for leaked internals, and the
server's logs for the API key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstreamProcess
from reliability_support import (
    API_KEY_ENV,
    INTRODUCTIONS,
    SECRET_API_KEY,
    Client,
    assert_problem,
    auth_on,
    leak_scan,
    openai_config,
    report,
    utterance,
)
from support import ServerProcess

pytestmark = pytest.mark.reliability

ATTEMPTS = 3
END_STATES = {"succeeded", "failed", "timed_out"}


@dataclass(frozen=True)
class Fault:
    step: str
    retried: bool
    what: str


FAULTS = [
    Fault("429", True, "429 without Retry-After"),
    Fault("429:1", True, "429 with Retry-After: 1"),
    Fault("500", False, "500"),
    Fault("502", True, "502"),
    Fault("503", True, "503"),
    Fault("hang:5", True, "hang (5 s, past the 800 ms attempt timeout)"),
    Fault("reset", True, "TCP reset"),
    Fault("truncated", False, "truncated JSON body (honest length)"),
    Fault("truncated:length", True, "truncated body, lying Content-Length"),
    Fault("malformed", False, "malformed JSON body"),
    Fault("wrong_shape", False, "JSON reply of the wrong shape"),
    Fault("slow_body:3", True, "body dribbled over 3 s"),
    Fault("not_json_content", False, "message content is prose, not JSON"),
]


@dataclass
class Row:
    fault: Fault
    resolve_status: int
    resolve_attempts: int
    resolve_s: float
    job_state: str
    finalize_attempts: int
    finalize_s: float


ROWS: list[Row] = []


@dataclass
class Rig:
    fake: FakeUpstreamProcess
    server: ServerProcess
    client: Client


@pytest.fixture(scope="module", params=["open", "auth", "workers2"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The server under test: ``open``; ``auth``: the auth plugin on and a created key;
    ``workers2``: ``ballast serve --workers 2`` (two processes on one port and one SQLite file)."""
    work = tmp_path_factory.mktemp(f"fault-matrix-{request.param}")
    auth_config, headers = auth_on(work) if request.param == "auth" else ("", {})
    workers = 2 if request.param == "workers2" else 1
    with FakeUpstreamProcess() as fake:
        # The matrix plays one fault after another against one server and counts the
        # attempts of each call on its own: the protections that remember across calls
        # (the circuit breaker, the retry budget) are off here, or the sustained faults
        # would open the breaker and spend the budget (tests/reliability/test_outage.py
        # covers them).
        # finalize_ms: a job makes two logical calls here (reconcile names the unnamed
        # speakers, then the report), each allowed its full attempts and waits.
        server = ServerProcess(work, config=openai_config(
                                   fake.base_url, finalize_ms=12000,
                                   extra="[plugins.circuit_breaker]\nenabled = false\n")
                               + auth_config,
                               env={API_KEY_ENV: SECRET_API_KEY, "BALLAST__PLUGINS__RETRY__BUDGET": "false",
                                    "BALLAST__SERVER__WORKERS": str(workers)})
        with server:
            yield Rig(fake, server, Client(server.base_url, headers=headers))
        # After the server stopped: the whole log, every line it ever wrote.
        logs = server.raw_logs()
        assert SECRET_API_KEY not in logs, "the API key reached the server's logs"
        for value in headers.values():
            assert value.split()[-1] not in logs, "a Ballast API key reached the server's logs"
    if ROWS:
        _report_rows(request.param)
        ROWS.clear()


def _report_rows(variant: str) -> None:
    lines = [f"{'fault':<18} {'resolve':>7} {'att':>3} {'s':>5}   {'finalize':<9} {'att':>3} {'s':>5}"]
    for r in ROWS:
        lines.append(f"{r.fault.step:<18} {r.resolve_status:>7} {r.resolve_attempts:>3} "
                     f"{r.resolve_s:>5.2f}   {r.job_state:<9} {r.finalize_attempts:>3} {r.finalize_s:>5.2f}")
    report(f"fault matrix ({variant}): resolve status, finalize job state, attempts at the fake "
           "per logical call", lines)


def _new_session(client: Client, sid: str, *, named: bool = False) -> None:
    status, _, body = client.call("POST", "/v1/sessions", {
        "session_id": sid, "title": "Fault drill",
        "participants": [{"name": "Alice"}, {"name": "Bob"}, {"name": "Carol"}]})
    assert status == 201, body
    batch = [utterance(i, i, INTRODUCTIONS[i], f"u{i}") for i in range(3)]
    batch += [utterance(3 + i, i % 3, f"point {i} about the roadmap", f"p{i}") for i in range(5)]
    if named:  # finalize then has no names to ask for: its only upstream call is the report's
        batch += [{"type": "speaker_renamed", "speaker": f"spk_{i}", "name": n}
                  for i, n in enumerate(["Alice", "Bob", "Carol"])]
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": batch})
    assert status == 200, body


def _task(received: dict[str, Any]) -> str:
    """Which question a request to the fake asked: ``resolve`` or ``report``."""
    system = received["json"]["messages"][0]["content"]
    return "resolve" if "task: resolve" in system else "report" if "task: report" in system else "?"


def _expect_clean(rig: Rig) -> None:
    leaks = leak_scan(rig.client.seen, extra=[
        f"{rig.fake.host}:{rig.fake.port}", f"localhost:{rig.fake.port}", SECRET_API_KEY])
    assert not leaks, "\n".join(leaks)


def _settled_session(client: Client, sid: str, within: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    view = client.session(sid)
    while view["state"] == "finalizing" and time.monotonic() < deadline:
        time.sleep(0.02)
        view = client.session(sid)
    return view


@pytest.mark.parametrize("fault", FAULTS, ids=[f.step for f in FAULTS])
def test_fault(rig: Rig, fault: Fault) -> None:
    client, fake = rig.client, rig.fake
    sid = "f-" + fault.step.replace(":", "-")
    _new_session(client, sid)
    before = client.session(sid)
    expected = ATTEMPTS if fault.retried else 1

    # Resolve: one logical call, answered with the documented 502 problem.
    fake.reset()
    fake.set_default(fault.step)
    started = time.monotonic()
    resolve_status, headers, body = client.call("POST", f"/v1/sessions/{sid}/resolve")
    resolve_s = time.monotonic() - started
    resolve_attempts = fake.attempts
    assert_problem(resolve_status, headers, body, statuses={502})
    assert body["detail"] == "Speaker resolution temporarily unavailable"
    assert resolve_attempts == expected, f"{fault.what}: {resolve_attempts} attempts for one resolve"
    if fault.step == "429:1":  # Retry-After is honoured: two waits of one second
        assert resolve_s >= 1.9, resolve_s

    # Finalize: the job ends (failed, or timed_out), it never stays running.
    fake.reset()
    fake.set_default(fault.step)
    started = time.monotonic()
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/finalize")
    assert status == 202, body
    job = client.poll_job(sid, within=20)
    finalize_s = time.monotonic() - started
    # The speakers have no names (resolve failed), so reconcile asks the model first: a
    # logical call of its own under the same policy, whose failure only costs the names.
    tasks = [_task(r) for r in fake.requests()]
    finalize_attempts = tasks.count("report")
    assert tasks.count("resolve") == expected, f"{fault.what}: {tasks} for reconcile's naming"
    ROWS.append(Row(fault, resolve_status, resolve_attempts, resolve_s, job["state"],
                    finalize_attempts, finalize_s))
    assert job["state"] in END_STATES and job["state"] != "succeeded", job
    assert job["error"] is not None and job["error"]["title"], job
    assert finalize_attempts == expected, f"{fault.what}: {finalize_attempts} attempts for one report"
    report_stage = next(s for s in job["stages"] if s["name"] == "report")
    assert report_stage["state"] in ("failed", "timed_out"), job

    # Nothing was lost, and the session is not stuck: state failed, finalize can run again.
    # (The job's end is visible a moment before the session's state is saved as failed.)
    after = _settled_session(client, sid)
    assert after["state"] == "failed", after
    assert (after["mutation_count"], after["last_seq"]) == (before["mutation_count"], before["last_seq"])
    status, _, body = client.call("GET", f"/v1/sessions/{sid}/report")
    assert status == 404, body

    # The fault clears: the same session works end to end.
    fake.reset()
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/finalize")
    assert status == 202 and body["job"]["attempt"] == 2, body
    job = client.poll_job(sid, within=20)
    assert job["state"] == "succeeded", job
    status, _, body = client.call("GET", f"/v1/sessions/{sid}/report")
    assert status == 200 and body["summary"], body

    _expect_clean(rig)


@pytest.mark.parametrize("script", ["503,503,ok", "reset,429,ok", "hang:5,502,ok"])
def test_transient_faults_recover_within_the_attempts(rig: Rig, script: str) -> None:
    client, fake = rig.client, rig.fake
    sid = "t-" + script.replace(",", "-").replace(":", "-")
    _new_session(client, sid)
    fake.reset()
    fake.script(*script.split(","))
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/resolve")
    assert status == 200, body
    assert body["speakers"] == {"spk_0": "Alice", "spk_1": "Bob", "spk_2": "Carol"}
    assert fake.attempts == 3

    fake.reset()
    fake.script(*script.split(","))
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/finalize")
    assert status == 202, body
    job = client.poll_job(sid, within=20)
    assert job["state"] == "succeeded", job
    assert fake.attempts == 3
    _expect_clean(rig)


def test_the_api_key_is_sent_upstream_but_never_shown(rig: Rig) -> None:
    """The leak checks are only meaningful if the key was really in play."""
    client, fake = rig.client, rig.fake
    _new_session(client, "key-check")
    fake.reset()
    status, _, _ = client.call("POST", "/v1/sessions/key-check/resolve")
    assert status == 200
    sent = fake.requests()
    assert sent and all(r["headers"].get("Authorization") == f"Bearer {SECRET_API_KEY}" for r in sent)
    assert SECRET_API_KEY not in rig.server.raw_logs()
    status, _, body = client.call("GET", "/openapi.json")
    assert status == 200 and SECRET_API_KEY not in str(body)


def test_upstream_failures_are_logged_with_their_attempts(rig: Rig) -> None:
    """The server-side record of a failed call: one upstream.failed line with attempts=3."""
    client, fake = rig.client, rig.fake
    _new_session(client, "log-check")
    fake.reset()
    fake.set_default("503")
    status, _, body = client.call("POST", "/v1/sessions/log-check/resolve")
    assert status == 502, body
    rid = body["request_id"]
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = [ln for ln in rig.server.logs() if ln.get("request_id") == rid]
        if any(ln.get("event") == "http.request" for ln in lines):
            break
        time.sleep(0.05)
    events = [ln["event"] for ln in lines]
    assert events.count("upstream.retry") == ATTEMPTS - 1, events
    failed = [ln for ln in lines if ln["event"] == "upstream.failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == ATTEMPTS, failed
    fake.reset()



async def _retry_until_second_attempt(base: str, sid: str, headers: dict[str, str]) -> dict[str, Any]:
    """POST finalize as fast as possible until attempt 2 has started; then read the job."""
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(2000):
            async with http.post(f"{base}/v1/sessions/{sid}/finalize") as resp:
                job: dict[str, Any] = (await resp.json())["job"]
            if job["attempt"] >= 2:
                break
        # Wait until the stages before "report" are recorded as done: attempt 2 is then
        # inside its hung report call (800 ms), which the record must show as running.
        for _ in range(100):
            async with http.get(f"{base}/v1/sessions/{sid}/finalize") as resp:
                job = (await resp.json())["job"]
            stages = {s["name"]: s["state"] for s in job["stages"]}
            if stages["events"] == "succeeded" or job["state"] != "running":
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        async with http.get(f"{base}/v1/sessions/{sid}/finalize") as resp:
            job = (await resp.json())["job"]
        return job


def test_an_immediate_retry_after_a_failed_job_is_followed_live(rig: Rig) -> None:
    """A client that re-runs finalize the instant the job fails gets a fully tracked attempt.

    The failed job used to finish its bookkeeping after the next attempt had started and
    unregister that attempt too, so ``GET .../finalize`` showed a stale record (stages
    still pending while they ran) and shutdown could not cancel the orphaned job.
    """
    client, fake = rig.client, rig.fake
    for i in range(3):
        sid = f"rerun-{i}"
        _new_session(client, sid, named=True)
        fake.reset()
        fake.script("500", "hang:3")  # attempt 1 fails at once, attempt 2 hangs a while
        job = asyncio.run(_retry_until_second_attempt(client.base_url, sid, client.headers))
        stages = {s["name"]: s["state"] for s in job["stages"]}
        assert (job["attempt"], job["state"], stages["report"]) == (2, "running", "running"), job
        job = client.poll_job(sid, within=20)
        assert (job["attempt"], job["state"]) == (2, "succeeded"), job
