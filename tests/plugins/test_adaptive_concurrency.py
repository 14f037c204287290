"""adaptive_concurrency: the limit algorithm on synthetic latencies, and the middleware.

The algorithm (:class:`GradientLimit`) reads no clock, so it is driven here by a small
discrete-event simulation: closed-loop clients against a server model whose latency
grows once the requests in flight pass its capacity. No test sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import Overloaded
from ballast.plugins.adaptive_concurrency import (
    SHARES,
    Admission,
    GradientLimit,
    Settings,
    _share_of,
)

BASE = 0.010   # unloaded latency of the model server, seconds
KNEE = 16      # requests in flight the model serves without queueing


def queueing(n: int) -> float:
    """Latency of a request admitted with ``n`` in flight: flat up to KNEE, then linear
    (throughput saturates at KNEE / BASE requests per second)."""
    return BASE * max(1.0, n / KNEE)


class Run:
    def __init__(self) -> None:
        self.admitted: list[tuple[float, float]] = []  # (finish time, latency)
        self.refused = 0
        self.refused_at: list[float] = []
        self.limits: list[tuple[float, int]] = []


def simulate(lim: GradientLimit, *, clients: int, seconds: float, start: float = 0.0,
             latency_of: Callable[[int], float] = queueing, retry_s: float = 0.005,
             share: float = 1.0) -> Run:
    """``clients`` closed-loop clients for ``seconds``: each sends, waits for the answer
    (or ``retry_s`` after a refusal) and sends again. Deterministic."""
    run = Run()
    events: list[tuple[float, int, int, float]] = []  # (time, seq, client, started or -1)
    seq = 0
    for c in range(clients):
        heapq.heappush(events, (start + c * 1e-5, seq, c, -1.0))
        seq += 1
    end = start + seconds
    while events:
        now, _, client, started = heapq.heappop(events)
        if started >= 0:  # a request finishes
            lim.release(now, now - started)
            run.admitted.append((now, now - started))
            run.limits.append((now, lim.limit))
            if now >= end:
                continue
        if now >= end:
            continue
        if lim.try_acquire(share):
            heapq.heappush(events, (now + latency_of(lim.in_flight), seq, client, now))
        else:
            run.refused += 1
            run.refused_at.append(now)
            heapq.heappush(events, (now + retry_s, seq, client, -1.0))
        seq += 1
    return run


def warmed(**kw: float) -> GradientLimit:
    """A limiter past its start-up probe (which pins the limit to ``min_limit`` until the
    unloaded latency is measured), at its initial limit."""
    lim = GradientLimit(**kw)  # type: ignore[arg-type]
    simulate(lim, clients=2, seconds=2.0, latency_of=lambda n: BASE)
    assert not lim.probing
    return lim


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_overload_converges_near_capacity_at_near_normal_latency() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=64)
    run = simulate(lim, clients=500, seconds=10.0)
    late = [lat for t, lat in run.admitted if t > 5.0]
    throughput = len(late) / 5.0
    assert KNEE <= lim.limit <= 4 * KNEE, lim.limit
    assert p99(late) <= 3.0 * BASE, p99(late)                 # near-normal latency
    assert throughput >= 0.95 * KNEE / BASE, throughput       # the capacity's worth of work
    assert run.refused > 0


def test_without_a_limit_the_same_load_queues() -> None:
    """The control: the model itself makes 500 clients wait ~30x the unloaded latency."""
    lim = GradientLimit(min_limit=1000, max_limit=1000, initial_limit=1000)
    run = simulate(lim, clients=500, seconds=5.0)
    assert p99([lat for t, lat in run.admitted if t > 2.0]) > 20 * BASE


def test_an_idle_server_does_not_learn_a_large_limit() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=64)
    simulate(lim, clients=4, seconds=10.0)
    assert lim.limit == 64  # 4 in flight never tested 64: no growth (app-limited)


def test_the_limit_grows_when_the_load_needs_it_and_latency_stays_flat() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=16)
    run = simulate(lim, clients=300, seconds=10.0, latency_of=lambda n: BASE)
    assert lim.limit >= 300
    assert run.admitted[-1][0] >= 9.9


def test_the_limit_stays_within_min_and_max() -> None:
    lim = GradientLimit(min_limit=8, max_limit=40, initial_limit=20)
    simulate(lim, clients=200, seconds=5.0, latency_of=lambda n: BASE)
    assert lim.limit == 40
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=20)
    # A server that collapses past 8 in flight.
    simulate(lim, clients=200, seconds=10.0, latency_of=lambda n: BASE if n <= 8 else 10 * BASE)
    assert 8 <= lim.limit <= 9
    now = 20.0
    for _ in range(20):  # drop after drop: cut to the floor, never below
        now += 0.2
        assert lim.try_acquire()
        lim.release(now, None, dropped=True)
    assert lim.limit == 8


def test_drops_cut_the_limit_by_a_fifth_per_window() -> None:
    lim = warmed(min_limit=8, max_limit=1000, initial_limit=100, window_s=0.1, min_samples=1)
    assert lim.limit == 100
    now = 10.0
    for _ in range(3):
        now += 0.1
        assert lim.try_acquire()
        lim.release(now, None, dropped=True)
    assert lim.limit == int(100 * 0.8 ** 3)


def test_the_limit_recovers_after_an_overload() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=64)
    simulate(lim, clients=500, seconds=5.0)
    squeezed = lim.limit
    # The flood is over; 4 clients see the unloaded latency and are never refused...
    quiet = simulate(lim, clients=4, seconds=3.0, start=5.0)
    assert quiet.refused == 0
    assert p99([lat for _, lat in quiet.admitted]) == pytest.approx(BASE)
    # ...and when more load comes that the server can take (its latency stays flat), the
    # limit climbs back past what the flood squeezed it to, within a few seconds.
    busy = simulate(lim, clients=100, seconds=5.0, start=8.0, latency_of=lambda n: BASE)
    assert squeezed < 50 and lim.limit >= 100
    assert busy.refused > 0 and not [t for t in busy.refused_at if t > 11.0]


def test_a_probe_relearns_the_unloaded_latency_under_sustained_load() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=64, probe_interval_s=2.0)
    simulate(lim, clients=500, seconds=3.0)
    assert lim.baseline == pytest.approx(BASE)
    # The workload changes: every request now takes twice as long, unloaded too. Without a
    # re-measure the old baseline would squeeze the limit to min_limit for good.
    slower: Callable[[int], float] = lambda n: 2 * queueing(n)  # noqa: E731
    seen_probe = False
    t = 3.0
    while t < 12.0:
        simulate(lim, clients=500, seconds=0.5, start=t, latency_of=slower)
        seen_probe = seen_probe or lim.probing
        t += 0.5
    assert seen_probe
    assert lim.baseline == pytest.approx(2 * BASE, rel=0.25)
    assert lim.limit >= KNEE


def window(lim: GradientLimit, latency: float, *, in_flight: int | None = None) -> None:
    """Complete the limiter's current window: ``in_flight`` requests (default: the
    limit's worth, so the load tests the limit), all taking ``latency``."""
    end = lim._window_end
    assert end is not None
    n = lim.limit if in_flight is None else in_flight
    for _ in range(n):
        assert lim.try_acquire()
    for i in range(n):
        lim.release(end - lim.window_s / 2 + i * 1e-6, latency)
    assert lim.try_acquire()
    assert lim.release(end, latency)  # the window's end: the limit is recomputed


def test_growth_is_at_most_sqrt_limit_a_window() -> None:
    """Room to grow (latency far under the tolerance) moves the limit up by sqrt(limit)
    a window, not in proportion to the headroom: one quiet window cannot double it."""
    lim = warmed(min_limit=8, max_limit=1000, initial_limit=100, window_s=0.1)
    seen = [lim.limit]
    for _ in range(3):
        window(lim, BASE)
        seen.append(lim.limit)
    assert seen == [100, 110, 120, 131]  # +10, +sqrt(110), +sqrt(120.5)


def test_growth_stops_where_the_latency_would_reach_the_tolerance() -> None:
    """Headroom smaller than sqrt(limit): the step is what the latency allows (past
    saturation latency grows with the requests in flight), so the limit does not
    overshoot into a queue it must then shed its way out of."""
    lim = warmed(min_limit=8, max_limit=1000, initial_limit=100, window_s=0.1, tolerance=1.5)
    window(lim, 1.4 * BASE)  # 1.5 / 1.4: room for about 7 % more
    assert lim.limit == 107


def test_a_flood_halves_the_limit_each_window_until_the_queue_is_gone() -> None:
    """Latency over twice the tolerated (a flood arriving with the limit where a lighter
    load left it) halves the limit every window instead of trimming it by a smoothed
    step, so the queue it lets in lasts a few windows, not a few seconds."""
    lim = warmed(min_limit=8, max_limit=1000, initial_limit=64, window_s=0.1)
    seen = []
    for _ in range(3):
        window(lim, 8 * BASE)
        seen.append(lim.limit)
    assert seen == [32, 16, 8]
    # Between 1 and 2 times the tolerance: a smoothed step (noise is not a flood).
    lim = warmed(min_limit=8, max_limit=1000, initial_limit=64, window_s=0.1)
    window(lim, 2.0 * BASE)  # gradient 0.75
    assert lim.limit == int(64 + 0.3 * (64 * 0.75 - 64))


def test_under_a_steady_flood_the_limit_holds_still() -> None:
    lim = GradientLimit(min_limit=8, max_limit=1000, initial_limit=64)
    run = simulate(lim, clients=500, seconds=10.0)
    late = [limit for t, limit in run.limits if t > 3.0]
    assert min(late) >= KNEE and max(late) <= 2 * KNEE, (min(late), max(late))


def test_shares_shed_deferrable_work_first_and_ingest_last() -> None:
    lim = warmed(min_limit=1, max_limit=10, initial_limit=10)
    for _ in range(8):
        assert lim.try_acquire(SHARES["ingest"])
    assert not lim.try_acquire(SHARES["deferrable"])   # 8 >= 7.5
    assert lim.try_acquire(SHARES["standard"])         # 8 < 9
    assert not lim.try_acquire(SHARES["standard"])     # 9 >= 9
    assert lim.try_acquire(SHARES["ingest"])           # 9 < 10
    assert not lim.try_acquire(SHARES["ingest"])
    assert lim.in_flight == 10


def test_route_classes() -> None:
    assert _share_of("POST", "/v1/sessions/{session_id}/mutations") == SHARES["ingest"]
    assert _share_of("GET", "/v1/sessions/{session_id}/mutations") == SHARES["standard"]
    assert _share_of("POST", "/v1/sessions") == SHARES["standard"]
    assert _share_of("GET", "/v1/sessions/{session_id}") == SHARES["standard"]
    assert _share_of("POST", "/v1/sessions/{session_id}/resolve") == SHARES["deferrable"]
    assert _share_of("POST", "/v1/sessions/{session_id}/finalize") == SHARES["deferrable"]
    assert SHARES["ingest"] > SHARES["standard"] > SHARES["deferrable"]


def test_settings_refuse_an_initial_limit_outside_the_bounds() -> None:
    with pytest.raises(ValueError, match="min_limit <= initial_limit <= max_limit"):
        Settings(min_limit=10, initial_limit=5)
    assert Settings().min_limit == 8 and Settings().max_limit == 1000


# --------------------------------------------------------------------------------------
# the middleware, in a real app
# --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def gate_app(admission: Admission, gate: asyncio.Event, bodies_read: list[int],
             entered: list[str] | None = None) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        if entered is not None:
            entered.append(request.path)
        await gate.wait()
        return web.json_response({"ok": True})

    async def ingest(request: web.Request) -> web.Response:
        bodies_read.append(len(await request.read()))
        await gate.wait()
        return web.json_response({"ok": True})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def overloaded(request: web.Request) -> web.Response:
        raise Overloaded(1, internal="bulkhead full")

    app = web.Application(middlewares=[web.middleware(admission)])
    app.router.add_get("/v1/sessions/{session_id}", slow)
    app.router.add_post("/v1/sessions/{session_id}/mutations", ingest)
    app.router.add_post("/v1/sessions/{session_id}/finalize", slow)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", health)
    app.router.add_get("/bulkhead", overloaded)
    return app


async def test_over_the_limit_is_refused_at_once_before_the_body_is_read(
        aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=4, max_limit=4, initial_limit=4), clock=clock)
    gate = asyncio.Event()
    bodies: list[int] = []
    client = await aiohttp_client(gate_app(adm, gate, bodies))
    holders = [asyncio.create_task(client.get(f"/v1/sessions/s{i}")) for i in range(3)]
    await until(lambda: adm.limiter.in_flight == 3)
    with capture_logs() as logs:
        # 3 of 4 in flight: standard work (share 0.9 -> 3.6) still fits, deferrable
        # (0.75 -> 3) does not; ingest fits.
        refused = await client.post("/v1/sessions/s/finalize")
        ingest = asyncio.create_task(client.post("/v1/sessions/s/mutations", data=b"x" * 5000))
        await until(lambda: adm.limiter.in_flight == 4)
        shed = await client.post("/v1/sessions/s/mutations", data=b"y" * 7000,
                                 headers={"X-Request-ID": "canary-0001"})
        health = await client.get("/healthz")
        metrics = await client.get("/metrics")
    assert refused.status == 503
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert shed.content_type == "application/problem+json"
    body = await shed.json()
    assert body["status"] == 503 and body["title"] == "Service overloaded"
    assert bodies == [5000]  # the shed request's 7000 bytes were never read
    assert health.status == 200 and metrics.status == 200
    # Two refusals within a second: one load.shed line, the second counted for later.
    lines = [ln for ln in logs if ln["event"] == "load.shed"]
    assert len(lines) == 1 and lines[0]["count"] == 1 and lines[0]["limit"] == 4
    assert adm.shed_total == 2
    gate.set()
    for r in [*(await asyncio.gather(*holders)), await ingest]:
        assert r.status == 200
    assert adm.limiter.in_flight == 0
    with capture_logs() as logs:
        clock.now += 1.5
        assert (await client.post("/v1/sessions/s/mutations", data=b"{}")).status == 200
    lines = [ln for ln in logs if ln["event"] == "load.shed"]
    assert len(lines) == 1 and lines[0]["count"] == 1 and lines[0]["total"] == 2


async def test_shed_lines_are_sampled_to_one_a_second_with_a_count(aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=1, max_limit=1, initial_limit=1), clock=clock)
    gate = asyncio.Event()
    client = await aiohttp_client(gate_app(adm, gate, []))
    holder = asyncio.create_task(client.get("/v1/sessions/hold"))
    await until(lambda: adm.limiter.in_flight == 1)
    with capture_logs() as logs:
        for i in range(50):
            clock.now += 0.1  # 50 refusals over 5 s, each of a new connection
            assert (await client.get(f"/v1/sessions/s{i}", headers={"Connection": "close"})).status == 503
    gate.set()
    assert (await holder).status == 200
    lines = [ln for ln in logs if ln["event"] == "load.shed"]
    assert 5 <= len(lines) <= 6
    assert sum(ln["count"] for ln in lines) + adm._unlogged == 50
    assert all(ln["log_level"] == "warning" and ln["kind"] == "overloaded" for ln in lines)


async def test_a_client_back_before_its_retry_after_waits_for_it_then_is_admitted_if_there_is_room(
        aiohttp_client: AiohttpClient) -> None:
    """Refused once, a connection that asks again at once (as wrk does) is not refused
    again at once: its request waits until the Retry-After it was given runs out, and
    is then admitted if a slot is free. Other connections are refused at once."""
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=1, max_limit=1, initial_limit=1), clock=clock, sleep=clock.sleep)
    gate = asyncio.Event()
    client = await aiohttp_client(gate_app(adm, gate, []))
    holder = asyncio.create_task(client.get("/v1/sessions/hold", headers={"Connection": "close"}))
    await until(lambda: adm.limiter.in_flight == 1)
    first = await client.get("/v1/sessions/a")  # a keep-alive connection, refused at once
    assert first.status == 503 and first.headers["Retry-After"] == "1"
    assert clock.slept == [] and adm.held_total == 0
    async with aiohttp.ClientSession() as another:  # another connection
        other = await another.get(client.make_url("/v1/sessions/b"))
        assert other.status == 503 and clock.slept == []
    clock.now += 0.25
    # Back on the same connection 0.25 s later; still full after the wait: refused.
    again = await client.get("/v1/sessions/a")
    assert again.status == 503
    assert clock.slept == [pytest.approx(0.75)] and adm.held_total == 1
    # Once more at once; this time the slot frees while it waits: admitted.
    gate.set()
    assert (await holder).status == 200
    await until(lambda: adm.limiter.in_flight == 0)
    adm.limiter.in_flight = 1  # taken again, as by another client
    original_sleep = adm.sleep

    async def free_the_slot(seconds: float) -> None:
        await original_sleep(seconds)
        adm.limiter.in_flight = 0

    adm.sleep = free_the_slot
    admitted = await client.get("/v1/sessions/a")
    assert admitted.status == 200
    assert clock.slept[-1] == pytest.approx(1.0) and adm.held_total == 2
    assert adm.shed_total == 3


async def test_with_hold_early_off_a_client_back_early_is_refused_at_once(
        aiohttp_client: AiohttpClient) -> None:
    """Behind a proxy that pools its connections, one connection carries many clients:
    ``hold_early = false`` refuses every request over the limit at once."""
    assert Settings().hold_early is True
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=1, max_limit=1, initial_limit=1), clock=clock, sleep=clock.sleep,
                    hold_early=False)
    gate = asyncio.Event()
    client = await aiohttp_client(gate_app(adm, gate, []))
    holder = asyncio.create_task(client.get("/v1/sessions/hold", headers={"Connection": "close"}))
    await until(lambda: adm.limiter.in_flight == 1)
    for _ in range(3):
        clock.now += 0.1
        assert (await client.get("/v1/sessions/a")).status == 503
    assert clock.slept == [] and adm.held_total == 0 and adm.shed_total == 3
    gate.set()
    assert (await holder).status == 200


async def test_a_hold_lasts_at_most_a_second_whatever_the_retry_after(aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=1, max_limit=1, initial_limit=1), clock=clock, sleep=clock.sleep,
                    retry_after_s=60)
    gate = asyncio.Event()
    client = await aiohttp_client(gate_app(adm, gate, []))
    holder = asyncio.create_task(client.get("/v1/sessions/hold", headers={"Connection": "close"}))
    await until(lambda: adm.limiter.in_flight == 1)
    assert (await client.get("/v1/sessions/a")).headers["Retry-After"] == "60"
    assert (await client.get("/v1/sessions/a")).status == 503
    assert clock.slept == [1.0]
    gate.set()
    assert (await holder).status == 200


async def test_a_long_poll_holds_no_slot_but_is_refused_when_deferrable_work_is(
        aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    adm = Admission(GradientLimit(min_limit=4, max_limit=4, initial_limit=4), clock=clock)
    gate = asyncio.Event()
    entered: list[str] = []
    client = await aiohttp_client(gate_app(adm, gate, [], entered))
    polls = [asyncio.create_task(client.get(f"/v1/sessions/p{i}?wait=5")) for i in range(10)]
    await until(lambda: len(entered) == 10)
    assert adm.limiter.in_flight == 0  # ten long-polls parked in the handler, no slot taken
    holders = [asyncio.create_task(client.get(f"/v1/sessions/h{i}")) for i in range(3)]
    await until(lambda: adm.limiter.in_flight == 3)
    refused = await client.get("/v1/sessions/late?wait=5")  # 3 >= 0.75 * 4
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    gate.set()
    for r in await asyncio.gather(*polls, *holders):
        assert r.status == 200


async def test_a_bulkhead_refusal_inside_counts_as_a_drop(aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    lim = warmed(min_limit=1, max_limit=100, initial_limit=100, min_samples=1)
    adm = Admission(lim, clock=clock)
    client = await aiohttp_client(gate_app(adm, asyncio.Event(), []))
    for _ in range(3):
        clock.now += 0.2
        assert (await client.get("/bulkhead")).status == 500  # no sanitizer in this app
    assert lim.limit < 100 and lim.in_flight == 0


def make_config(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "ballast.toml"
    path.write_text("")
    return load_settings(path, environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db"),
                                        "BALLAST__STORAGE__DURABILITY": "normal", **env})


async def test_in_the_default_stack_refusals_are_problems_with_a_request_id(
        aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    config = make_config(tmp_path, BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__MIN_LIMIT="1",
                         BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__INITIAL_LIMIT="1",
                         BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__MAX_LIMIT="1")
    app = build_app(config)
    client = await aiohttp_client(app)
    assert (await client.post("/v1/sessions", json={"session_id": "a"})).status == 201
    adm = next(m for m in app.middlewares if isinstance(m, Admission))
    adm.limiter.in_flight = 1  # the one slot taken, as by a request still running
    resp = await client.get("/v1/sessions/a", headers={"X-Request-ID": "req-000000001"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert resp.content_type == "application/problem+json"
    assert resp.headers["X-Request-ID"] == "req-000000001"
    assert (await resp.json())["request_id"] == "req-000000001"
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    adm.limiter.in_flight = 0
    assert (await client.get("/v1/sessions/a")).status == 200
    assert adm.shed_total == 1
