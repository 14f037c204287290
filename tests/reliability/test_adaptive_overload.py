"""Adaptive concurrency: far past capacity, the server keeps its goodput and its latency.

A real server with the default plugins. Every client sends 100-mutation batches in a
closed loop, and honours ``Retry-After`` when refused, as a well-behaved client does.

The phases alternate (reference, flood, reference, flood, ...) and each ratio is the
median over the rounds of flood / the reference just before it, so that a neighbour's
load on a shared machine weighs on both sides of a ratio alike.

1. Reference: ``REF_CONNECTIONS`` connections, plus a canary client that measures its
   own latency.
2. Flood: ``FLOOD_CONNECTIONS`` connections, plus the canary. The server must keep
   doing its capacity's worth of work (goodput, 2xx mutations per second, at least
   ``GOODPUT_FLOOR`` of the reference) with the canary's admitted p99 at most
   ``P99_CEILING`` times the reference p99; every refusal is a 503 problem with
   ``Retry-After`` and the request id; nothing acknowledged is lost.
3. Recovery: the reference load again, with no refusal at all.

The canary retries a refusal after 50 ms rather than ``Retry-After``, on a new
connection: it is there to measure what an admitted request waits, so it needs admitted
requests (on its old connection, back before its ``Retry-After``, it would be held
until then, as a client that retries at once is).

Ratios of two phases of one run, not absolute timings, so a slow machine slows both.
A phase's goodput counts the answers that finished inside its window, divided by the
window's length (a refused client never sleeps past the end of it).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import random
import statistics
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from loadgen import Conn
from reliability_support import Client, report, scale
from support import ServerProcess

pytestmark = pytest.mark.reliability

REF_CONNECTIONS = 4
FLOOD_CONNECTIONS = scale(256, 512)
ROUNDS = 3
REF_S = 2.0
FLOOD_S = float(scale(4, 20))
RECOVERY_S = 3.0
BATCH = 100
SESSIONS = [f"flood-{i}" for i in range(32)]
#: The issue's targets, held to the median over the rounds of per-round ratios (single
#: rounds on a shared 2-core machine swing widely either way: bench/README.md, 6.).
GOODPUT_FLOOR = 0.8
#: Without the plugin the same flood measures 10x to 20x (every request queues).
P99_CEILING = 4.0
#: Recovery is one round, not a median, so its goodput is held only against collapse
#: (a limit stuck low); the issue's criterion for it is that nothing is shed.
RECOVERY_FLOOR = 0.5

_ids = itertools.count()


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    ok: int = 0
    shed: int = 0
    latencies: list[float] = field(default_factory=list)
    canary: list[float] = field(default_factory=list)
    acked: dict[str, set[str]] = field(default_factory=dict)
    bad_refusals: list[str] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)

    @property
    def goodput(self) -> float:
        return self.ok * BATCH / self.seconds


def _batch(tag: str) -> bytes:
    n = next(_ids)
    return orjson.dumps({"mutations": [
        {"id": f"{tag}-{n}-{j}", "type": "note", "text": f"note {j} of batch {n} from {tag}"}
        for j in range(BATCH)]})


async def _client(base: str, sid: str, tag: str, until: float, phase: Phase, *,
                  canary: bool = False) -> None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = Conn(host, int(port))
    path = f"/v1/sessions/{sid}/mutations"
    rng = random.Random(tag)
    try:
        await _send_until(conn, path, sid, tag, until, phase, rng, canary)
    finally:
        await conn.close()


async def _send_until(conn: Conn, path: str, sid: str, tag: str, until: float, phase: Phase,
                      rng: random.Random, canary: bool) -> None:
    while time.monotonic() < until:
        body = _batch(tag)
        rid = f"{tag}-{next(_ids):010d}"
        started = time.monotonic()
        try:
            status, hdrs, payload = await conn.request("POST", path, body, {"X-Request-ID": rid})
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            phase.other[type(exc).__name__] += 1
            continue
        retry_after = hdrs.get("retry-after")
        echoed = hdrs.get("x-request-id")
        ctype = hdrs.get("content-type", "")
        finished = time.monotonic()
        elapsed = finished - started
        if status == 200:
            # Acknowledged is acknowledged (checked against the store), but goodput and
            # latency count only what finished inside the phase's window.
            accepted = orjson.loads(payload)["accepted"]
            phase.acked.setdefault(sid, set()).update(a["id"] for a in accepted)
            if finished <= until:
                phase.ok += 1
                phase.latencies.append(elapsed)
                if canary:
                    phase.canary.append(elapsed)
            continue
        if status != 503:
            phase.other[f"status {status}"] += 1
            continue
        phase.shed += 1
        problem = orjson.loads(payload) if ctype.startswith("application/problem+json") else {}
        if not retry_after or echoed != rid or problem.get("request_id") != rid:
            phase.bad_refusals.append(f"{retry_after=} {echoed=} {ctype=} {payload[:120]!r}")
            continue
        # As told, with jitter as well-behaved clients add (so refused clients do not all
        # come back in the same millisecond); the canary measures what an admitted
        # request costs, so it asks again soon (one client is no load worth speaking of).
        # Never past the end of the phase: a client asleep then would stretch the
        # phase's measured length without adding any request to it.
        pause = 0.05 if canary else float(retry_after) * rng.uniform(1.0, 1.5)
        if canary:
            # Back before its Retry-After on the same connection, the canary would be
            # held until then (as clients that retry at once are): it asks on a new one.
            await conn.close()
        await asyncio.sleep(max(0.0, min(pause, until - time.monotonic())))


async def _load(base: str, connections: int, start_at: float, until: float, name: str,
                canary: bool) -> Phase:
    phase = Phase(name)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    if canary:
        tasks = [_client(base, SESSIONS[0], f"{name}-canary", until, phase, canary=True)]
    else:
        tasks = [_client(base, SESSIONS[i % len(SESSIONS)], f"{name}{i}", until, phase)
                 for i in range(connections)]
    await asyncio.gather(*tasks)
    return phase


def _load_process(base: str, connections: int, start_at: float, until: float, name: str) -> Phase:
    return asyncio.run(_load(base, connections, start_at, until, name, canary=False))


def _run(pool: ProcessPoolExecutor, base: str, connections: int, seconds: float, name: str) -> Phase:
    """The load from another process (so its work does not delay the canary's event
    loop), the canary from this one; both start at the same monotonic instant."""
    start_at = time.monotonic() + 1.0
    until = start_at + seconds
    future = pool.submit(_load_process, base, connections, start_at, until, name)
    canary = asyncio.run(_load(base, 1, start_at, until, name, canary=True))
    phase = future.result(timeout=seconds + 60)
    # The window the requests were counted in; not the time until the last client
    # returned, which included refused clients' Retry-After sleeps past the end (up to
    # 1.5 s on a 4 s flood: the goodput ratio was understated by up to a quarter).
    phase.seconds = seconds
    phase.ok += canary.ok
    phase.shed += canary.shed
    phase.latencies += canary.latencies
    phase.canary = canary.canary
    for sid, ids in canary.acked.items():
        phase.acked.setdefault(sid, set()).update(ids)
    phase.bad_refusals += canary.bad_refusals
    phase.other += canary.other
    return phase


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _line(p: Phase) -> str:
    return (f"{p.name}: {p.goodput:.0f} mutations/s, {p.ok} batches ok, {p.shed} shed, "
            f"p50 {_p(p.latencies, 0.5) * 1000:.0f} ms, p99 {_p(p.latencies, 0.99) * 1000:.0f} ms, "
            f"canary p99 {_p(p.canary, 0.99) * 1000:.0f} ms ({len(p.canary)} ok)")


@pytest.mark.timeout(scale(180, 600))
def test_past_capacity_goodput_and_latency_hold_and_the_rest_is_told_to_come_back(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    with server:
        client = Client(server.base_url)
        for sid in SESSIONS:
            assert client.call("POST", "/v1/sessions", {"session_id": sid})[0] == 201
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            refs, floods = [], []
            for r in range(ROUNDS):
                refs.append(_run(pool, server.base_url, REF_CONNECTIONS, REF_S, f"ref{r}-"))
                floods.append(_run(pool, server.base_url, FLOOD_CONNECTIONS, FLOOD_S, f"flood{r}-"))
            after = _run(pool, server.base_url, REF_CONNECTIONS, RECOVERY_S, "after")
        stored = {sid: {m["id"] for m in client.all_mutations(sid)} for sid in SESSIONS}
        logs = server.logs()
        assert server.proc is not None and server.proc.poll() is None
    ref, flood = _merge("ref", refs), _merge("flood", floods)
    goodput = [f.goodput / r.goodput for r, f in zip(refs, floods, strict=True)]
    p99 = [_p(f.canary, 0.99) / _p(r.latencies, 0.99) for r, f in zip(refs, floods, strict=True)]
    shed_lines = [ln for ln in logs if ln.get("event") == "load.shed"]
    limits = [ln["limit"] for ln in logs if ln.get("event") == "load.limit"]
    report(f"adaptive concurrency: {REF_CONNECTIONS} vs {FLOOD_CONNECTIONS} connections, "
           f"{BATCH}-mutation batches", [
        *map(_line, refs), *map(_line, floods), _line(after),
        f"goodput flood/ref per round {_r(goodput)}, median {statistics.median(goodput):.2f}; "
        f"canary p99 flood / ref p99 per round {_r(p99)}, median {statistics.median(p99):.2f}",
        f"load.shed lines {len(shed_lines)} counting {sum(ln['count'] for ln in shed_lines)}; "
        f"load.limit values {limits}",
    ])
    for phase in (*refs, *floods, after):
        assert not phase.other, (phase.name, phase.other)
        assert not phase.bad_refusals, (phase.name, phase.bad_refusals[:3])
        for sid, ids in phase.acked.items():
            assert ids <= stored[sid], f"{len(ids - stored[sid])} acknowledged mutations lost in {sid}"
    assert ref.shed == 0, "the reference load is within capacity"
    assert all(len(f.canary) >= 5 for f in floods), [len(f.canary) for f in floods]
    assert statistics.median(p99) <= P99_CEILING, p99
    assert statistics.median(goodput) >= GOODPUT_FLOOR, goodput
    assert flood.shed > 0, "the flood did not exceed the limit"
    # Recovery: the reference load again, none of it shed.
    assert after.shed == 0
    assert after.goodput >= RECOVERY_FLOOR * refs[-1].goodput, (after.goodput, refs[-1].goodput)
    # Sampled: at most one load.shed line a second, and together they count the refusals
    # (those after the last line are counted by the next one, if any).
    assert 0 < len(shed_lines) <= ROUNDS * (FLOOD_S + REF_S + 3) + RECOVERY_S
    assert sum(ln["count"] for ln in shed_lines) <= flood.shed


def _r(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _merge(name: str, phases: list[Phase]) -> Phase:
    out = Phase(name)
    for p in phases:
        out.seconds += p.seconds
        out.ok += p.ok
        out.shed += p.shed
        out.latencies += p.latencies
        out.canary += p.canary
        for sid, ids in p.acked.items():
            out.acked.setdefault(sid, set()).update(ids)
        out.bad_refusals += p.bad_refusals
        out.other += p.other
    return out
