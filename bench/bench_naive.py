"""Benchmark: Ballast's durable ingest against the app a user would write instead.

Two servers on the same disk, side by side: ``ballast serve`` with the default config
(every default plugin on, ``durability = "full"``) and :mod:`bench.naive_app` (aiohttp,
``json.loads``, a thread per request doing BEGIN IMMEDIATE / INSERT each / COMMIT, WAL,
``synchronous=FULL``). Both fsync before they answer 200. wrk sends unique-id
utterances round-robin over 64 sessions:

* ``single``: one mutation per request, 64 connections;
* ``batch100``: 100 mutations per request, 16 connections.

``ballast_asyncio`` is the same Ballast on the stdlib event loop (``server.uvloop =
false``), to show what uvloop adds.

Each round runs both servers for both loads, the server order alternating; figures
are medians over rounds and ratios medians of per-round ratios.

    python bench/bench_naive.py [--rounds 3] [--duration 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH_DIR,
    LUA_DIR,
    PYTHON,
    ServerProcess,
    WorkDir,
    ballast_server,
    cpu_seconds,
    free_port,
    http_json,
    machine,
    median,
    verdict,
    write_result,
    wrk,
)

SESSIONS = 64
PREFIX = "naive-"
LOADS = {"single": (1, 64), "batch100": (100, 16)}  # per request, connections
TARGETS = {"single": 2.5, "batch100": 1.5}


def run(rounds: int, duration: float, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    info = machine()
    per_round: list[dict[str, Any]] = []
    with WorkDir("naive") as work:
        port = free_port()
        servers = {
            "ballast": ballast_server(work / "ballast.db", durability="full", stdout=work / "ballast.log",
                                      extra_env=extra_env),
            "ballast_asyncio": ballast_server(work / "asyncio.db", durability="full",
                                              stdout=work / "asyncio.log",
                                              extra_env={**(extra_env or {}),
                                                         "BALLAST__SERVER__UVLOOP": "false"}),
            "naive": ServerProcess([PYTHON, str(BENCH_DIR / "naive_app.py"), "--db", str(work / "naive.db"),
                                    "--port", str(port)], port=port),
        }
        try:
            for s in servers.values():
                s.start()
                for i in range(SESSIONS):
                    status, body = http_json("POST", f"{s.origin}/v1/sessions",
                                             {"session_id": f"{PREFIX}{i}"})
                    if status != 201:
                        raise RuntimeError(f"could not create a session: {status} {body}")

            def load(name: str, kind: str, tag: str, seconds: float) -> dict[str, Any]:
                per_request, conns = LOADS[kind]
                server = servers[name]
                cpu = cpu_seconds(server.pid)
                result = wrk(server.origin, threads=1, connections=conns, duration_s=seconds,
                             script=LUA_DIR / "mutations.lua",
                             script_args=[PREFIX, str(SESSIONS), str(per_request), tag])
                # Goodput: 2xx only (wrk ignores Retry-After, so a 503 is retried at once).
                ok = result["requests"] - result["non_2xx"]
                result["mutations_per_s"] = round(ok * per_request / result["duration_s"], 1)
                result["cpu_us_per_mutation"] = round(
                    (cpu_seconds(server.pid) - cpu) * 1e6 / max(ok * per_request, 1), 1)
                return result

            for name in servers:
                for kind in LOADS:
                    load(name, kind, f"w{name[0]}{kind[0]}", 1)
            names = list(servers)
            for r in range(rounds):
                row: dict[str, Any] = {}
                for kind in LOADS:
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        row[f"{name}_{kind}"] = load(name, kind, f"r{r}{name[0]}{kind[0]}", duration)
                per_round.append(row)
                print(f"round {r + 1}/{rounds}: " + ", ".join(
                    f"{k} {v['mutations_per_s']:.0f}/s ({v['non_2xx']} non-2xx)" for k, v in row.items()),
                    file=sys.stderr)
        finally:
            for s in servers.values():
                s.stop()

    ratios = {kind: round(median([row[f"ballast_{kind}"]["mutations_per_s"]
                                  / row[f"naive_{kind}"]["mutations_per_s"] for row in per_round]), 2)
              for kind in LOADS}
    return {
        "benchmark": "naive_ingest", "machine": info,
        "method": {"tool": "wrk -t1, bench/lua/mutations.lua", "loads": LOADS, "duration_s": duration,
                   "rounds": rounds, "ballast": "default config, durability full",
                   "naive": "bench/naive_app.py", "extra_env": extra_env or {}},
        "median_mutations_per_s": {k: median([row[k]["mutations_per_s"] for row in per_round])
                                   for k in per_round[0]},
        "median_cpu_us_per_mutation": {k: median([row[k]["cpu_us_per_mutation"] for row in per_round])
                                       for k in per_round[0]},
        "median_p99_ms": {k: median([row[k]["p99_ms"] for row in per_round]) for k in per_round[0]},
        "non_2xx": {k: sum(row[k]["non_2xx"] for row in per_round) for k in per_round[0]},
        "ratios": ratios,
        "ratios_on_asyncio": {kind: round(median([
            row[f"ballast_asyncio_{kind}"]["mutations_per_s"] / row[f"naive_{kind}"]["mutations_per_s"]
            for row in per_round]), 2) for kind in LOADS},
        "targets": {f"{kind}_vs_naive": {"target": f">= {TARGETS[kind]}x", "measured": ratios[kind],
                                         "result": verdict(ratios[kind] >= TARGETS[kind])} for kind in LOADS},
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.duration)
    if not args.no_write:
        write_result("naive_ingest", result)
    print(json.dumps({k: result[k] for k in ("median_mutations_per_s", "median_cpu_us_per_mutation",
                                             "ratios", "ratios_on_asyncio", "targets")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
