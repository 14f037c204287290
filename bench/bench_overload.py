"""Benchmark: goodput and admitted latency from half to eight times capacity, with the
``adaptive_concurrency`` plugin on and off, side by side.

Two ``ballast serve`` processes with the default config on their own SQLite files,
one with ``adaptive_concurrency`` disabled. Clients send 100-mutation batches in a
closed loop (one request in flight per connection) and honour ``Retry-After`` with
jitter, as well-behaved clients do. Capacity is ``--capacity`` connections (4: about
where one server process on two cores stops gaining throughput); the offered load is
that many connections times 0.5, 1, 2, 4 and 8 (and 64, the reliability test's flood).
At each load level both servers run in turn (order alternating); goodput is 2xx
mutations per second over the level's window (answers that finished inside it),
latencies are of admitted (2xx) requests as the client saw them.

    python bench/bench_overload.py [--seconds 3] [--capacity 4] [--rounds 1]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench import common

sys.path.insert(0, str(common.ROOT / "tests" / "reliability"))
from loadgen import Conn  # the lean load client of the reliability tests

MULTIPLES = (0.5, 1, 2, 4, 8, 64)  # 64: the reliability suite's 256-connection flood
BATCH = 100
SESSIONS = [f"bench-{i}" for i in range(32)]
_ids = itertools.count()


async def _client(port: int, sid: str, until: float, out: dict[str, Any], rng: random.Random) -> None:
    conn = Conn("127.0.0.1", port)
    path = f"/v1/sessions/{sid}/mutations"
    while time.monotonic() < until:
        n = next(_ids)
        body = orjson.dumps({"mutations": [
            {"id": f"m{n}-{j}", "type": "note", "text": f"note {j} of batch {n}"} for j in range(BATCH)]})
        started = time.monotonic()
        try:
            status, hdrs, _ = await conn.request("POST", path, body)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            out["errors"] += 1
            continue
        finished = time.monotonic()
        if finished > until:
            break  # outside the measured window
        if status == 200:
            out["ok"] += 1
            out["latencies"].append(finished - started)
        elif status == 503:
            out["shed"] += 1
            # Never past the end: a client asleep then would stretch the level's length.
            pause = float(hdrs.get("retry-after", "1")) * rng.uniform(1.0, 1.5)
            await asyncio.sleep(max(0.0, min(pause, until - time.monotonic())))
        else:
            out["other"] += 1
    await conn.close()


async def _load(port: int, connections: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": 0, "shed": 0, "errors": 0, "other": 0, "latencies": []}
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(_client(port, SESSIONS[i % len(SESSIONS)], until, out, random.Random(i))
                           for i in range(connections)))
    # The window's length, not the time until the last client returned (which counted
    # refused clients' Retry-After sleeps past the end, up to 1.5 s on a 3 s level).
    elapsed = seconds
    lat = sorted(out.pop("latencies"))

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

    out.update(goodput=round(out["ok"] * BATCH / elapsed), p50_ms=pct(0.5), p99_ms=pct(0.99),
               seconds=round(elapsed, 2))
    return out


def run(seconds: float, capacity: int, rounds: int) -> dict[str, Any]:
    info = common.machine()
    with common.WorkDir("overload") as work:
        servers = {
            "on": common.ballast_server(work / "on.db", stdout=work / "on.log"),
            "off": common.ballast_server(work / "off.db", stdout=work / "off.log", extra_env={
                "BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__ENABLED": "false"}),
        }
        rows: list[dict[str, Any]] = []
        try:
            for s in servers.values():
                s.start()
                for sid in SESSIONS:
                    common.http_json("POST", f"{s.origin}/v1/sessions", {"session_id": sid})
                asyncio.run(_load(s.port, capacity, 1.0))  # warm-up
            for r in range(rounds):
                for i, multiple in enumerate(MULTIPLES):
                    conns = max(1, round(capacity * multiple))
                    order = ["on", "off"] if (i + r) % 2 == 0 else ["off", "on"]
                    row: dict[str, Any] = {"round": r, "multiple": multiple, "connections": conns}
                    for name in order:
                        row[name] = asyncio.run(_load(servers[name].port, conns, seconds))
                        time.sleep(1.5)  # refused clients' Retry-After runs out; the server settles
                    rows.append(row)
                    print(f"x{multiple} ({conns} conns): " + "  ".join(
                        f"{n}: {row[n]['goodput']}/s p50 {row[n]['p50_ms']} p99 {row[n]['p99_ms']} "
                        f"shed {row[n]['shed']}" for n in ("on", "off")), file=sys.stderr)
        finally:
            for s in servers.values():
                s.stop()

    summary = []
    for multiple in MULTIPLES:
        at = [row for row in rows if row["multiple"] == multiple]
        summary.append({"multiple": multiple, "connections": at[0]["connections"], **{
            f"{name}_{key}": common.median([row[name][key] for row in at])
            for name in ("on", "off") for key in ("goodput", "p50_ms", "p99_ms", "shed")}})
    return {"benchmark": "overload", "machine": info,
            "method": {"batch": BATCH, "capacity_connections": capacity, "seconds": seconds,
                       "rounds": rounds, "client": "tests/reliability/loadgen.py, Retry-After x U(1, 1.5)"},
            "summary": summary, "rows": rows, "chart": chart(summary)}


def chart(summary: list[dict[str, Any]]) -> str:
    """Goodput and p99 bars, on and off, per load multiple."""
    top_g = max(max(s["on_goodput"], s["off_goodput"]) for s in summary) or 1
    top_p = max(max(s["on_p99_ms"], s["off_p99_ms"]) for s in summary) or 1
    lines = ["load  plugin  goodput (mutations/s)            admitted p99 (ms)"]
    for s in summary:
        for name in ("on", "off"):
            g, p = s[f"{name}_goodput"], s[f"{name}_p99_ms"]
            lines.append(f"x{s['multiple']:<4} {name:<6}  {'#' * round(20 * g / top_g):<20} {g:>6.0f}   "
                         f"{'=' * round(20 * p / top_p):<20} {p:>6.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load level and server")
    parser.add_argument("--capacity", type=int, default=4, help="connections that saturate one server")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.capacity, args.rounds)
    shown = result["chart"] + "\n" + json.dumps(result["summary"], indent=1)
    return common.finish("overload", result, args, shown)


if __name__ == "__main__":
    sys.exit(main())
