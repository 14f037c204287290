"""Outage protection end to end: real ``ballast serve`` processes against a fake upstream.

What a sustained upstream outage costs the upstream and the clients, with the circuit
breaker, the retry budget, the shared cooldown and the fallback as shipped (and as
configured per test), plus the hostile-upstream cases: redirects are never followed and
oversized bodies are never read whole. Attempts are counted at the fake, which is the
upstream's own view of the load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstreamProcess, Step
from reliability_support import (
    API_KEY_ENV,
    INTRODUCTIONS,
    SECRET_API_KEY,
    Client,
    assert_problem,
    header,
    leak_scan,
    openai_config,
    report,
    rss_mb,
    utterance,
)
from support import ServerProcess

PARTICIPANTS = [{"name": "Alice"}, {"name": "Bob"}, {"name": "Carol"}]
GENERIC = "Speaker resolution temporarily unavailable"


@dataclass
class Rig:
    fake: FakeUpstreamProcess
    server: ServerProcess
    client: Client


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Any]:
    """Start a fake upstream and a server configured with ``extra`` TOML and ``env``."""
    started: list[tuple[FakeUpstreamProcess, ServerProcess]] = []

    def make(extra: str = "", env: dict[str, str] | None = None, *, request_ms: int = 5000,
             timeout_ms: int = 800) -> Rig:
        fake = FakeUpstreamProcess()
        fake.start()
        server = ServerProcess(tmp_path / f"server{len(started)}",
                               config=openai_config(fake.base_url, extra=extra, request_ms=request_ms,
                                                    timeout_ms=timeout_ms),
                               env={API_KEY_ENV: SECRET_API_KEY, **(env or {})})
        started.append((fake, server))
        server.start()
        return Rig(fake, server, Client(server.base_url))

    yield make
    for fake, server in started:
        try:
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
            assert SECRET_API_KEY not in server.raw_logs()
        finally:
            fake.stop()


def new_session(client: Client, sid: str) -> None:
    status, _, body = client.call("POST", "/v1/sessions", {"session_id": sid, "participants": PARTICIPANTS})
    assert status == 201, body
    batch = [utterance(i, i, INTRODUCTIONS[i], f"u{i}") for i in range(3)]
    batch += [utterance(3 + i, i % 3, f"we will ship item {i}", f"p{i}") for i in range(3)]
    status, _, body = client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": batch})
    assert status == 200, body


@dataclass
class Outcome:
    status: int
    headers: dict[str, str]
    body: Any
    seconds: float


async def _resolve_many(base: str, sids: list[str], concurrency: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)
    out: list[Outcome] = []

    async def one(http: aiohttp.ClientSession, sid: str) -> None:
        async with gate:
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/sessions/{sid}/resolve") as resp:
                body = await resp.json(content_type=None)
                out.append(Outcome(resp.status, dict(resp.headers), body, time.perf_counter() - t0))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(http, sid) for sid in sids))
    return out


def resolve_many(rig: Rig, sids: list[str], concurrency: int) -> list[Outcome]:
    outcomes = asyncio.run(_resolve_many(rig.server.base_url, sids, concurrency))
    for o in outcomes:  # kept for the leak scan
        rig.client.seen.append(_exchange(o))
    return outcomes


def _exchange(o: Outcome) -> Any:
    from reliability_support import Exchange

    return Exchange("POST", "/v1/sessions/*/resolve", o.status, o.headers, o.body)


def expect_clean(rig: Rig) -> None:
    leaks = leak_scan(rig.client.seen, extra=[f"127.0.0.1:{rig.fake.port}", f"localhost:{rig.fake.port}",
                                              SECRET_API_KEY])
    assert not leaks, "\n".join(leaks)


def events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in server.logs() if line.get("event") == name]


def wait_for_event(server: ServerProcess, name: str, within: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = events(server, name)
        if found:
            return found
        time.sleep(0.05)
    return []


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------------------
# the circuit breaker: a hard outage, then recovery
# --------------------------------------------------------------------------------------


def test_a_hard_outage_costs_the_upstream_little_and_heals_on_its_own(make_rig: Any) -> None:
    rig = make_rig("[plugins.circuit_breaker]\nbreak_s = 2\nmax_break_s = 4\n")
    sids = [f"down-{i}" for i in range(60)]
    for sid in sids:
        new_session(rig.client, sid)
    rig.fake.reset()
    rig.fake.set_default("503")

    outcomes = resolve_many(rig, sids, concurrency=6)
    attempts = rig.fake.attempts
    per_call = attempts / len(sids)
    refused = [o for o in outcomes if o.status == 503]
    failed = [o for o in outcomes if o.status == 502]
    report("hard outage, 60 resolves 6 at a time (breaker + budget on)", [
        f"upstream attempts {attempts} ({per_call:.2f} per call); 502: {len(failed)}, 503: {len(refused)}",
        f"503 latency p50 {percentile([o.seconds for o in refused], 0.5) * 1000:.1f} ms, "
        f"p99 {percentile([o.seconds for o in refused], 0.99) * 1000:.1f} ms",
    ])
    assert per_call <= 1.2, per_call
    assert len(failed) + len(refused) == len(sids)
    assert len(refused) >= 40, [o.status for o in outcomes]
    for o in refused:
        assert_problem(o.status, o.headers, o.body, statuses={503})
        assert o.body["detail"] == GENERIC and o.body["kind"] == "circuit_open", o.body
        retry_after = header(o.headers, "Retry-After")
        assert retry_after is not None and 1 <= int(retry_after) <= 4, retry_after
    for o in failed:
        assert_problem(o.status, o.headers, o.body, statuses={502})
        assert o.body["detail"] == GENERIC
    # Refused calls never wait on the upstream: far below one attempt timeout (800 ms).
    assert percentile([o.seconds for o in refused], 0.5) < 0.4
    # Each refusal is one warning line, not an error with a traceback.
    assert len(events(rig.server, "upstream.refused")) == len(refused)
    assert len(events(rig.server, "error.unhandled")) == len(failed)
    [opened, *_] = wait_for_event(rig.server, "circuit.opened")
    assert opened["upstream"] == "openai" and opened["window_failures"] >= 10
    assert opened["ratio"] >= 0.5 and opened["window_attempts"] >= 10

    # The upstream heals: the half-open probe closes the breaker within a break or two.
    rig.fake.set_default("ok")
    healed_after = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 6.0:
        status, _, body = rig.client.call("POST", "/v1/sessions/down-0/resolve")
        if status == 200:
            healed_after = time.monotonic() - t0
            break
        assert status in (502, 503), body
        time.sleep(0.2)
    assert healed_after is not None, "no resolve succeeded within 6 s of the upstream healing"
    assert wait_for_event(rig.server, "circuit.half_open") and wait_for_event(rig.server, "circuit.closed")
    for sid in sids[1:21]:
        before = rig.fake.attempts
        status, _, body = rig.client.call("POST", f"/v1/sessions/{sid}/resolve")
        assert status == 200 and body["speakers"]["spk_0"] == "Alice", body
        assert rig.fake.attempts - before == 1
    report("recovery", [f"first 200 after {healed_after:.2f} s; the next 20 took one attempt each"])
    expect_clean(rig)


# --------------------------------------------------------------------------------------
# the retry budget alone
# --------------------------------------------------------------------------------------


def test_without_the_breaker_the_retry_budget_bounds_the_storm(make_rig: Any) -> None:
    rig = make_rig("[plugins.circuit_breaker]\nenabled = false\n")
    sids = [f"b-{i}" for i in range(40)]
    for sid in sids:
        new_session(rig.client, sid)
    rig.fake.reset()
    rig.fake.set_default("503")
    outcomes = resolve_many(rig, sids, concurrency=4)
    per_call = rig.fake.attempts / len(sids)
    report("hard outage, breaker off, 40 resolves 4 at a time", [
        f"upstream attempts {rig.fake.attempts} ({per_call:.2f} per call)"])
    assert per_call <= 1.5, per_call
    assert {o.status for o in outcomes} == {502}
    assert all(o.body["detail"] == GENERIC for o in outcomes)
    denied = wait_for_event(rig.server, "upstream.retry_denied")
    assert denied and denied[0]["kind"] == "budget_exhausted" and denied[0]["upstream"] == "openai"
    kinds = {line["kind"] for line in events(rig.server, "upstream.failed")}
    assert "budget_exhausted" in kinds
    expect_clean(rig)


# --------------------------------------------------------------------------------------
# the shared cooldown
# --------------------------------------------------------------------------------------


def test_one_retry_after_pauses_every_caller(make_rig: Any) -> None:
    rig = make_rig(env={"BALLAST__PLUGINS__RETRY__MAX_RETRY_AFTER_S": "5"})
    sids = [f"c-{i}" for i in range(9)]
    for sid in sids:
        new_session(rig.client, sid)
    rig.fake.reset()
    rig.fake.script("429:2")

    results: list[Outcome] = []

    def first() -> None:
        results.extend(resolve_many(rig, sids[:1], 1))

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.3)
    later = resolve_many(rig, sids[1:], 8)
    thread.join(10)
    outcomes = results + later
    assert [o.status for o in outcomes] == [200] * 9, [(o.status, o.body) for o in outcomes]
    sent = rig.fake.requests()
    assert sent[0]["step"]["kind"] == "status"
    t429 = sent[0]["received_at"]
    gaps = [r["received_at"] - t429 for r in sent[1:]]
    report("shared cooldown", [f"{len(sent)} requests; first after the 429 at +{min(gaps):.2f} s"])
    assert len(sent) == 10  # the 429, its retry, and one attempt for each of the 8 others
    assert min(gaps) >= 1.95, gaps


def test_a_caller_that_cannot_wait_out_the_cooldown_fails_at_once(make_rig: Any) -> None:
    rig = make_rig(env={"BALLAST__PLUGINS__RETRY__MAX_RETRY_AFTER_S": "5"}, request_ms=1500)
    for sid in ("w-0", "w-1"):
        new_session(rig.client, sid)
    rig.fake.reset()
    rig.fake.script("429:4")
    status, _, body = rig.client.call("POST", "/v1/sessions/w-0/resolve")
    assert status == 502 and body["kind"] == "budget", body  # its own wait outlasts its budget
    t0 = time.monotonic()
    status, headers, body = rig.client.call("POST", "/v1/sessions/w-1/resolve")
    took = time.monotonic() - t0
    assert_problem(status, headers, body, statuses={503})
    assert body["kind"] == "cooldown" and body["detail"] == GENERIC
    assert 1 <= int(header(headers, "Retry-After") or 0) <= 4
    assert took < 1.0, took
    assert rig.fake.attempts == 1
    expect_clean(rig)


# --------------------------------------------------------------------------------------
# the fallback
# --------------------------------------------------------------------------------------


def test_fallback_answers_degraded_from_the_builtin_provider(make_rig: Any) -> None:
    rig = make_rig("[plugins.fallback]\nenabled = true\n", request_ms=10000)
    new_session(rig.client, "fb")
    rig.fake.reset()
    rig.fake.set_default("503")
    status, headers, body = rig.client.call("POST", "/v1/sessions/fb/resolve")
    assert status == 200, body
    assert header(headers, "X-Ballast-Degraded") == "inference"
    assert body["degraded"] is True
    assert body["speakers"]["spk_0"] == "Alice" and body["speakers"]["spk_1"] == "Bob"
    used = wait_for_event(rig.server, "fallback.used")
    assert used and used[0]["operation"] == "resolve" and used[0]["kind"] == "status"

    status, _, body = rig.client.call("POST", "/v1/sessions/fb/finalize")
    assert status == 202, body
    job = rig.client.poll_job("fb", within=30)
    assert job["state"] == "succeeded", job
    status, headers, report_body = rig.client.call("GET", "/v1/sessions/fb/report")
    assert status == 200 and report_body["degraded"] is True and report_body["summary"]
    assert header(headers, "X-Ballast-Degraded") == "inference"

    # A healthy upstream's answers carry no mark.
    rig.fake.set_default("ok")
    new_session(rig.client, "fb-ok")
    status, headers, body = rig.client.call("POST", "/v1/sessions/fb-ok/resolve")
    assert status == 200 and "degraded" not in body and header(headers, "X-Ballast-Degraded") is None
    expect_clean(rig)


# --------------------------------------------------------------------------------------
# hostile upstreams (issue: bounded cost per request)
# --------------------------------------------------------------------------------------


def test_a_redirect_is_never_followed(make_rig: Any) -> None:
    with FakeUpstreamProcess() as elsewhere:
        rig = make_rig()
        new_session(rig.client, "r")
        rig.fake.reset()
        rig.fake.set_default(Step.redirect(elsewhere.base_url + "/chat/completions", 307))
        status, headers, body = rig.client.call("POST", "/v1/sessions/r/resolve")
        assert_problem(status, headers, body, statuses={502})
        assert body["kind"] == "redirect" and body["detail"] == GENERIC
        assert elsewhere.attempts == 0 and elsewhere.stats()["redirected"] == 0
        assert rig.fake.attempts == 1  # not retried
        [failed] = wait_for_event(rig.server, "upstream.failed")
        assert (failed["kind"], failed["status"]) == ("redirect", 307)
        text = rig.server.raw_logs()
        assert str(elsewhere.port) not in text and "Location" not in text
    expect_clean(rig)


def test_an_oversized_upstream_body_fails_fast_with_bounded_memory(make_rig: Any) -> None:
    rig = make_rig(env={"BALLAST__INFERENCE__MAX_RESPONSE_BYTES": str(2 * 1024 * 1024)},
                   timeout_ms=20000, request_ms=30000)
    new_session(rig.client, "big")
    assert rig.server.proc is not None
    before = rss_mb(rig.server.proc.pid) or 0.0
    for step in ("huge:300000000", "huge:300000000:length"):
        rig.fake.reset()
        rig.fake.set_default(step)
        t0 = time.monotonic()
        status, headers, body = rig.client.call("POST", "/v1/sessions/big/resolve")
        took = time.monotonic() - t0
        assert_problem(status, headers, body, statuses={502})
        assert body["kind"] == "too_large", body
        assert rig.fake.attempts == 1, step  # never retried into memory again
        assert took < 10, took
    after = rss_mb(rig.server.proc.pid) or 0.0
    report("300 MB upstream body", [f"server RSS {before:.0f} -> {after:.0f} MiB"])
    assert after - before < 64, (before, after)
    kinds = [line["kind"] for line in events(rig.server, "upstream.failed")]
    assert kinds.count("too_large") == 2
    expect_clean(rig)
