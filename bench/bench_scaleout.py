"""Benchmark 6: scale-out: SQLite and PostgreSQL, one process and ``--workers 2``.

Four servers run side by side for the whole run, each on its own database:

* ``sqlite_x1``: ``ballast serve`` on a SQLite file (durability full);
* ``sqlite_w2``: ``ballast serve --workers 2`` on another SQLite file;
* ``pg_x1``: ``ballast serve`` on PostgreSQL (``synchronous_commit`` on);
* ``pg_w2``: ``ballast serve --workers 2`` on PostgreSQL (its own database).

Each round measures every server, in an order that rotates, on three loads (wrk, 64
connections, 64 sessions, time-bounded): ``single`` (one utterance per POST),
``batch100`` (100 per POST; every mutation has a unique id) and ``get`` (``GET
/v1/sessions/{id}``). Figures are medians over rounds; ratios are medians of per-round
ratios, so a load spike that hits one round hits both sides of its ratio.

PostgreSQL is the server at ``BALLAST_BENCH_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); the benchmark makes its own two
databases there and drops them at the end.

    python bench/bench_scaleout.py [--rounds 3] [--duration 4] [--connections 64]
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ballast.config import redact_url
from bench import common

SESSIONS = 64
PREFIX = "scale-"
CONFIGS = ("sqlite_x1", "sqlite_w2", "pg_x1", "pg_w2")
LOADS = ("single", "batch100", "get")
TARGET_PG_BATCH = 1.3
TARGET_SQLITE_GET = 1.3
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _with_database(url: str, database: str) -> str:
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}/{database}" + (f"?{query}" if query else "")


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _wait_workers(log: Path, workers: int, timeout: float = 30.0) -> None:
    """With --workers N, /healthz answers once ONE worker is up; wait for all of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count('"server.started"') >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{workers} workers did not start: see {log}")


def run(rounds: int, duration: float, connections: int) -> dict[str, Any]:
    info = common.machine()
    pg_server = os.environ.get("BALLAST_BENCH_PG_URL", DEFAULT_PG)
    tag = secrets.token_hex(3)
    pg_dbs = {"pg_x1": f"ballast_bench_{tag}_x1", "pg_w2": f"ballast_bench_{tag}_w2"}
    for name in pg_dbs.values():
        asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}"'))
    per_round: list[dict[str, Any]] = []
    try:
        with common.WorkDir("scaleout") as work:
            servers = {}
            for config in CONFIGS:
                workers = 2 if config.endswith("w2") else 1
                env = {"BALLAST__SERVER__WORKERS": str(workers)}
                if config.startswith("pg"):
                    env.update({"BALLAST__STORAGE__BACKEND": "postgres",
                                "BALLAST__STORAGE__URL": _with_database(pg_server, pg_dbs[config])})
                servers[config] = common.ballast_server(work / f"{config}.db", stdout=work / f"{config}.log",
                                                        extra_env=env)
            for server in servers.values():
                server.start()
            try:
                for config, server in servers.items():
                    _wait_workers(work / f"{config}.log", 2 if config.endswith("w2") else 1)
                    common.create_sessions(server.origin, PREFIX, SESSIONS, title="scale")
                mutations_lua = common.LUA_DIR / "mutations.lua"
                get_lua = common.LUA_DIR / "get.lua"

                def load(config: str, kind: str, label: str) -> dict[str, Any]:
                    origin = servers[config].origin
                    if kind == "get":
                        return common.wrk(f"{origin}/v1/sessions/{PREFIX}1", threads=1,
                                          connections=connections, duration_s=duration, script=get_lua)
                    per_request = 1 if kind == "single" else 100
                    result = common.wrk(origin, threads=1, connections=connections, duration_s=duration,
                                        script=mutations_lua,
                                        script_args=[PREFIX, str(SESSIONS), str(per_request), label])
                    common.add_goodput(result, per_request)  # 2xx only
                    return result

                for config in CONFIGS:  # warm-up: connections, caches, prepared statements
                    load(config, "single", f"warm-{config}")
                for r in range(rounds):
                    order = common.rotated(CONFIGS, r)
                    row: dict[str, Any] = {"order": list(order)}
                    for config in order:
                        row[config] = {kind: load(config, kind, f"r{r}{config}{kind}") for kind in LOADS}
                    per_round.append(row)
                    print(f"round {r + 1}/{rounds}: " + "; ".join(
                        f"{c} single {row[c]['single']['mutations_per_s']:.0f}/s "
                        f"batch {row[c]['batch100']['mutations_per_s']:.0f}/s "
                        f"get {row[c]['get']['rps']:.0f}/s" for c in CONFIGS), file=sys.stderr)
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        for name in pg_dbs.values():
            asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def med(config: str, kind: str, key: str) -> float:
        return round(common.median([row[config][kind][key] for row in per_round]), 1)

    def ratio(a: str, b: str, kind: str, key: str) -> float:
        return round(common.median([row[a][kind][key] / row[b][kind][key] for row in per_round]), 2)

    table = {c: {"single_mutations_per_s": med(c, "single", "mutations_per_s"),
                 "batch100_mutations_per_s": med(c, "batch100", "mutations_per_s"),
                 "get_per_s": med(c, "get", "rps"),
                 "single_p99_ms": med(c, "single", "p99_ms"),
                 "batch100_p99_ms": med(c, "batch100", "p99_ms"),
                 "get_p99_ms": med(c, "get", "p99_ms")} for c in CONFIGS}
    ratios = {
        "pg_w2_vs_pg_x1_batch100": ratio("pg_w2", "pg_x1", "batch100", "mutations_per_s"),
        "pg_w2_vs_pg_x1_single": ratio("pg_w2", "pg_x1", "single", "mutations_per_s"),
        "pg_w2_vs_pg_x1_get": ratio("pg_w2", "pg_x1", "get", "rps"),
        "sqlite_w2_vs_sqlite_x1_get": ratio("sqlite_w2", "sqlite_x1", "get", "rps"),
        "sqlite_w2_vs_sqlite_x1_single": ratio("sqlite_w2", "sqlite_x1", "single", "mutations_per_s"),
        "sqlite_w2_vs_sqlite_x1_batch100": ratio("sqlite_w2", "sqlite_x1", "batch100", "mutations_per_s"),
        "pg_x1_vs_sqlite_x1_batch100": ratio("pg_x1", "sqlite_x1", "batch100", "mutations_per_s"),
    }
    errors = {c: sum(row[c][k]["errors"] for row in per_round for k in LOADS) for c in CONFIGS}
    non_2xx = {c: sum(row[c][k]["non_2xx"] for row in per_round for k in LOADS) for c in CONFIGS}
    return {
        "benchmark": "scaleout",
        "machine": info,
        "method": {
            "tool": "wrk -t1; bench/lua/mutations.lua (unique ids, round-robin over sessions), "
                    "bench/lua/get.lua (GET one session)",
            "connections": connections, "sessions": SESSIONS, "duration_s": duration,
            "rounds": rounds, "plugins": "all on", "sqlite_durability": "full",
            "postgres": "synchronous_commit on, pool_size 10 per process, local server",
        },
        "median": table,
        "ratios": ratios,
        "errors": errors,
        "non_2xx": non_2xx,
        "targets": {
            "pg_w2_vs_pg_x1_batch100": {
                "target": f">= {TARGET_PG_BATCH}x", "measured": ratios["pg_w2_vs_pg_x1_batch100"],
                "result": common.verdict(ratios["pg_w2_vs_pg_x1_batch100"] >= TARGET_PG_BATCH)},
            "sqlite_w2_vs_sqlite_x1_get": {
                "target": f">= {TARGET_SQLITE_GET}x", "measured": ratios["sqlite_w2_vs_sqlite_x1_get"],
                "result": common.verdict(ratios["sqlite_w2_vs_sqlite_x1_get"] >= TARGET_SQLITE_GET)},
        },
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3, duration=4.0, connections=64)
    args = parser.parse_args(argv)
    pg_server = os.environ.get("BALLAST_BENCH_PG_URL", DEFAULT_PG)
    try:
        asyncio.run(_admin(pg_server, "SELECT 1"))
    except Exception as exc:  # no server: record why, as the other benchmarks do
        skipped = f"no PostgreSQL server at {redact_url(pg_server)} ({type(exc).__name__})"
        return common.finish("scaleout", {"benchmark": "scaleout", "machine": common.machine(),
                                          "skipped": skipped}, args, f"skipped: {skipped}")
    result = run(args.rounds, args.duration, args.connections)
    return common.finish("scaleout", result, args, "\n".join(
        f"{name}: {t['measured']} (target {t['target']}): {t['result']}"
        for name, t in result["targets"].items()))


if __name__ == "__main__":
    raise SystemExit(main())
