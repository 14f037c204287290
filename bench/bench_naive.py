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

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

SESSIONS = 64
PREFIX = "naive-"
LOADS = {"single": (1, 64), "batch100": (100, 16)}  # per request, connections
TARGETS = {"single": 2.5, "batch100": 1.5}


def run(rounds: int, duration: float, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    info = common.machine()
    per_round: list[dict[str, Any]] = []
    with common.WorkDir("naive") as work:
        port = common.free_port()
        servers = {
            "ballast": common.ballast_server(work / "ballast.db", durability="full",
                                             stdout=work / "ballast.log", extra_env=extra_env),
            "ballast_asyncio": common.ballast_server(work / "asyncio.db", durability="full",
                                                     stdout=work / "asyncio.log",
                                                     extra_env={**(extra_env or {}),
                                                                "BALLAST__SERVER__UVLOOP": "false"}),
            "naive": common.ServerProcess([common.PYTHON, str(common.BENCH_DIR / "naive_app.py"),
                                           "--db", str(work / "naive.db"), "--port", str(port)], port=port),
        }
        try:
            for s in servers.values():
                s.start()
                common.create_sessions(s.origin, PREFIX, SESSIONS)

            def load(name: str, kind: str, tag: str, seconds: float) -> dict[str, Any]:
                per_request, conns = LOADS[kind]
                result = common.wrk_cpu(servers[name], threads=1, connections=conns, duration_s=seconds,
                                        script=common.LUA_DIR / "mutations.lua",
                                        script_args=[PREFIX, str(SESSIONS), str(per_request), tag])
                # Goodput: 2xx only (wrk ignores Retry-After, so a 503 is retried at once).
                ok = common.add_goodput(result, per_request)
                result["cpu_us_per_mutation"] = round(result["cpu_s"] * 1e6 / max(ok * per_request, 1), 1)
                return result

            for name in servers:
                for kind in LOADS:
                    load(name, kind, f"w{name[0]}{kind[0]}", 1)
            names = list(servers)
            for r in range(rounds):
                row: dict[str, Any] = {}
                for kind in LOADS:
                    order = common.rotated(names, r)
                    for name in order:
                        row[f"{name}_{kind}"] = load(name, kind, f"r{r}{name[0]}{kind[0]}", duration)
                per_round.append(row)
                print(f"round {r + 1}/{rounds}: " + ", ".join(
                    f"{k} {v['mutations_per_s']:.0f}/s ({v['non_2xx']} non-2xx)" for k, v in row.items()),
                    file=sys.stderr)
        finally:
            for s in servers.values():
                s.stop()

    ratios = {kind: round(common.median([row[f"ballast_{kind}"]["mutations_per_s"]
                                         / row[f"naive_{kind}"]["mutations_per_s"] for row in per_round]), 2)
              for kind in LOADS}
    return {
        "benchmark": "naive_ingest", "machine": info,
        "method": {"tool": "wrk -t1, bench/lua/mutations.lua", "loads": LOADS, "duration_s": duration,
                   "rounds": rounds, "ballast": "default config, durability full",
                   "naive": "bench/naive_app.py", "extra_env": extra_env or {}},
        "median_mutations_per_s": {k: common.median([row[k]["mutations_per_s"] for row in per_round])
                                   for k in per_round[0]},
        "median_cpu_us_per_mutation": {k: common.median([row[k]["cpu_us_per_mutation"] for row in per_round])
                                       for k in per_round[0]},
        "median_p99_ms": {k: common.median([row[k]["p99_ms"] for row in per_round]) for k in per_round[0]},
        "non_2xx": {k: sum(row[k]["non_2xx"] for row in per_round) for k in per_round[0]},
        "ratios": ratios,
        "ratios_on_asyncio": {kind: round(common.median([
            row[f"ballast_asyncio_{kind}"]["mutations_per_s"] / row[f"naive_{kind}"]["mutations_per_s"]
            for row in per_round]), 2) for kind in LOADS},
        "targets": {f"{kind}_vs_naive": {"target": f">= {TARGETS[kind]}x", "measured": ratios[kind],
                                         "result": common.verdict(ratios[kind] >= TARGETS[kind])}
                    for kind in LOADS},
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3, duration=4.0)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.duration)
    return common.finish("naive_ingest", result, args, {
        k: result[k] for k in ("median_mutations_per_s", "median_cpu_us_per_mutation", "ratios",
                               "ratios_on_asyncio", "targets")})


if __name__ == "__main__":
    sys.exit(main())
