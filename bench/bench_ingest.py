"""Benchmark 2: durable ingest of mutations, against the fsync ceiling of a plain loop.

With ``durability = "full"`` a 200 on ``POST .../mutations`` means the batch is
fsynced. A plain sqlite3 loop that commits one row per transaction (WAL,
``synchronous=FULL``) is bounded by the disk's fsync rate; Ballast's writer commits
whatever has queued up in one transaction, so concurrent requests share each fsync.

Each round runs, in a rotating order and on the same disk:

* ``sqlite_loop``: one fsynced row per transaction, in this process, for ``duration``;
* ``single``: wrk, 64 connections, one utterance per request, to ``ballast serve``
  (all plugins on, durability full) over 64 sessions;
* ``batch100``: the same with 100 utterances per request;
* ``single_normal`` (reference): ``single`` against a second server with
  ``durability = "normal"`` (no fsync per commit). When it is no faster than ``single``,
  the fsync is not what limits ingest: the HTTP request path is.

Every mutation has a unique id (ids are checked for duplicates on insert). Only
mutations in 2xx answers count: with ``adaptive_concurrency`` on, a saturated server
refuses some requests with 503, which wrk retries at once without honouring
``Retry-After``. Figures are medians over rounds; the ratio is the median of per-round
ratios.

    python bench/bench_ingest.py [--rounds 5] [--duration 5] [--connections 64]
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ballast.sessions.sqlite_schema import migrate
from bench import common

SESSIONS = 64
PREFIX = "ingest-"
TARGET_VS_LOOP = 1.5
TARGET_BATCH = 50_000
TEXT = "and then we looked at the numbers again and they still did not add up"


def sqlite_loop(path: Path, duration: float) -> dict[str, Any]:
    """Rows/s of one-row transactions with a full fsync each (the no-group-commit ceiling)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        migrate(conn, path)  # the store's own schema, whatever its version
        payload = json.dumps({"speaker": "spk_0", "start_ms": 0, "end_ms": 900, "text": TEXT})
        n = 0
        latencies: list[float] = []
        start = time.perf_counter()
        end = start + duration
        now = start
        while now < end:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO mutations (session_pk, seq, mutation_id, type, payload)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (n % SESSIONS, n, f"m{n}", "utterance", payload))
            conn.execute("COMMIT")
            n += 1
            t = time.perf_counter()
            latencies.append(t - now)
            now = t
        elapsed = now - start
    finally:
        conn.close()
    latencies.sort()
    return {"rows": n, "duration_s": round(elapsed, 3), "rows_per_s": round(n / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3)}


def run(rounds: int, duration: float, connections: int) -> dict[str, Any]:
    info = common.machine()  # taken before the run: date and load average at its start
    per_round: list[dict[str, Any]] = []
    with common.WorkDir("ingest") as work:
        server = common.ballast_server(work / "ballast.db", durability="full", stdout=work / "server.log")
        normal = common.ballast_server(work / "normal.db", durability="normal", stdout=work / "normal.log")
        with server, normal:
            for origin in (server.origin, normal.origin):
                common.create_sessions(origin, PREFIX, SESSIONS, title="ingest")
            lua = common.LUA_DIR / "mutations.lua"

            def load(origin: str, per_request: int, tag: str) -> dict[str, Any]:
                result = common.wrk(origin, threads=1, connections=connections, duration_s=duration,
                                    script=lua, script_args=[PREFIX, str(SESSIONS), str(per_request), tag])
                common.add_goodput(result, per_request)  # 2xx only
                return result

            # First connections, caches, statement compilation.
            load(server.origin, 1, "warmup")
            load(normal.origin, 1, "warmup")
            kinds = ["sqlite_loop", "single", "batch100", "single_normal"]
            for r in range(rounds):
                order = common.rotated(kinds, r)
                row: dict[str, Any] = {"order": order}
                for kind in order:
                    if kind == "sqlite_loop":
                        row[kind] = sqlite_loop(work / "loop.db", duration)
                    elif kind == "single":
                        row[kind] = load(server.origin, 1, f"r{r}s")
                    elif kind == "single_normal":
                        row[kind] = load(normal.origin, 1, f"r{r}n")
                    else:
                        row[kind] = load(server.origin, 100, f"r{r}b")
                per_round.append(row)
                print(f"round {r + 1}/{rounds}: loop {row['sqlite_loop']['rows_per_s']:.0f} rows/s, "
                      f"single {row['single']['mutations_per_s']:.0f}/s, "
                      f"batch100 {row['batch100']['mutations_per_s']:.0f}/s, "
                      f"single_normal {row['single_normal']['mutations_per_s']:.0f}/s", file=sys.stderr)
            stored = 0
            for i in range(SESSIONS):
                _, body = common.http_json("GET", f"{server.origin}/v1/sessions/{PREFIX}{i}")
                stored += body["mutation_count"]
            rss = server.status()

    acked = sum(row[k]["requests"] * (1 if k == "single" else 100)
                for row in per_round for k in ("single", "batch100"))
    loop_rate = common.median([row["sqlite_loop"]["rows_per_s"] for row in per_round])
    single_rate = common.median([row["single"]["mutations_per_s"] for row in per_round])
    batch_rate = common.median([row["batch100"]["mutations_per_s"] for row in per_round])
    normal_rate = common.median([row["single_normal"]["mutations_per_s"] for row in per_round])
    ratio = common.median([row["single"]["mutations_per_s"] / row["sqlite_loop"]["rows_per_s"]
                           for row in per_round])

    def lat(kind: str, key: str) -> float:
        return round(common.median([row[kind][key] for row in per_round]), 3)

    errors = {k: sum(row[k]["errors"] for row in per_round)
              for k in ("single", "batch100", "single_normal")}
    non_2xx = {k: sum(row[k]["non_2xx"] for row in per_round)
               for k in ("single", "batch100", "single_normal")}
    return {
        "benchmark": "ingest",
        "machine": info,
        "method": {
            "tool": "wrk -t1 with bench/lua/mutations.lua (unique ids, round-robin over sessions)",
            "connections": connections, "sessions": SESSIONS, "duration_s": duration,
            "rounds": rounds, "durability": "full", "plugins": "all on",
            "baseline": "sqlite3, WAL, synchronous=FULL, one row per transaction, same schema",
        },
        "median": {
            "sqlite_loop_rows_per_s": loop_rate,
            "single_mutations_per_s": single_rate,
            "batch100_mutations_per_s": batch_rate,
            "single_vs_sqlite_loop": round(ratio, 2),
            "single_normal_mutations_per_s": normal_rate,
            "single_vs_single_normal": round(common.median([
                row["single"]["mutations_per_s"] / row["single_normal"]["mutations_per_s"]
                for row in per_round]), 2),
        },
        "latency_ms": {
            "single": {"p50": lat("single", "p50_ms"), "p99": lat("single", "p99_ms")},
            "single_normal": {"p50": lat("single_normal", "p50_ms"),
                              "p99": lat("single_normal", "p99_ms")},
            "batch100": {"p50": lat("batch100", "p50_ms"), "p99": lat("batch100", "p99_ms")},
            "sqlite_loop_commit": {"p50": lat("sqlite_loop", "p50_ms"),
                                   "p99": lat("sqlite_loop", "p99_ms")},
        },
        "errors": errors,
        "non_2xx": non_2xx,
        "acked_mutations_counted_by_wrk": acked,
        "stored_mutations": stored,
        "server_rss_kb": rss,
        "targets": {
            "single_vs_sqlite_loop": {"target": f">= {TARGET_VS_LOOP}x", "measured": round(ratio, 2),
                                      "result": common.verdict(ratio >= TARGET_VS_LOOP)},
            "batch100_mutations_per_s": {"target": f">= {TARGET_BATCH}", "measured": batch_rate,
                                         "result": common.verdict(batch_rate >= TARGET_BATCH)},
        },
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=5, duration=5.0, connections=64)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.duration, args.connections)
    return common.finish("ingest", result, args,
                         {k: result[k] for k in ("median", "latency_ms", "errors", "non_2xx", "targets")})


if __name__ == "__main__":
    sys.exit(main())
