"""Benchmark: what the ``auth`` plugin costs on the cheapest real request.

``GET /v1/sessions/{id}`` against two ``ballast serve`` processes on one SQLite file,
side by side:

* ``auth_off``: the default config;
* ``auth_on``: the same with the auth plugin enabled, every request carrying a valid
  key (the rate limit set out of reach, so every request is served);

and, for reference, what a refusal costs: ``auth_on`` asked without a key (401).
Each round runs wrk against each in turn (the order rotates); figures are medians of
the rounds, ratios medians of the per-round ratios. CPU per request (the server's user
+ system time over the run, divided by requests) is steadier than throughput here.

    python bench/bench_auth.py [--rounds 3] [--duration 5] [--connections 16]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.bench_overhead import SESSION, seed_session

TARGET_ON_VS_OFF = 0.95


def create_key(keys_file: Path) -> str:
    argv = [common.BALLAST, "keys", "create", "--tenant", "default", "--keys-file", str(keys_file), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    key: str = json.loads(out.stdout)["key"]
    return key


def run(rounds: int, duration: float, connections: int) -> dict[str, Any]:
    info = common.machine()
    with common.WorkDir("auth") as work:
        db = work / "bench.db"
        with common.ballast_server(db) as seeder:
            seed_session(seeder.origin)
        keys_file = work / "keys.toml"
        key = create_key(keys_file)
        auth_env = {"BALLAST__PLUGINS__AUTH__ENABLED": "true",
                    "BALLAST__PLUGINS__AUTH__KEYS_FILE": str(keys_file),
                    "BALLAST__PLUGINS__AUTH__RATE_PER_S": "1000000",
                    "BALLAST__PLUGINS__AUTH__BURST": "1000000"}
        servers = {"auth_off": common.ballast_server(db, stdout=work / "off.log"),
                   "auth_on": common.ballast_server(db, stdout=work / "on.log", extra_env=auth_env)}
        # name -> (server, lua script, environment for wrk)
        runs = {"auth_off": ("auth_off", common.LUA_DIR / "get.lua", {}),
                "auth_on": ("auth_on", common.LUA_DIR / "get_auth.lua", {"BALLAST_BENCH_KEY": key}),
                "refused_401": ("auth_on", common.LUA_DIR / "get.lua", {})}
        path = f"/v1/sessions/{SESSION}"
        try:
            for server in servers.values():
                server.start()
            per_round: list[dict[str, Any]] = []
            names = list(runs)
            for srv, lua, env in runs.values():  # warm-up
                common.wrk(servers[srv].origin + path, connections=connections, duration_s=1,
                           script=lua, env=env)
            for r in range(rounds):
                order = common.rotated(names, r)
                row: dict[str, Any] = {"order": order}
                for name in order:
                    srv, lua, env = runs[name]
                    row[name] = common.wrk_cpu(servers[srv], path, connections=connections,
                                               duration_s=duration, script=lua, env=env)
                per_round.append(row)
                common.print_round(r, rounds, row, names)
        finally:
            for server in servers.values():
                server.stop()

    def med(name: str, key: str) -> float:
        return common.median([row[name][key] for row in per_round])

    ratio = common.median([row["auth_on"]["rps"] / row["auth_off"]["rps"] for row in per_round])
    return {
        "benchmark": "auth",
        "machine": info,
        "method": {"request": f"GET {path}", "tool": "wrk", "connections": connections,
                   "duration_s": duration, "rounds": rounds,
                   "refused_401": "the auth_on server asked without a key"},
        "median_rps": {n: round(med(n, "rps"), 1) for n in runs},
        "median_cpu_us_per_request": {n: round(med(n, "cpu_us_per_request"), 1) for n in runs},
        "median_p50_ms": {n: round(med(n, "p50_ms"), 3) for n in runs},
        "errors": {n: sum(row[n]["errors"] for row in per_round) for n in runs},
        "ratios": {"auth_on_vs_auth_off": round(ratio, 3)},
        "targets": {"auth_on_vs_auth_off": {"target": f">= {TARGET_ON_VS_OFF}", "measured": round(ratio, 3),
                                            "result": common.verdict(ratio >= TARGET_ON_VS_OFF)}},
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3, duration=5.0, connections=16)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.duration, args.connections)
    return common.finish("auth", result, args, {
        k: result[k] for k in ("median_rps", "median_cpu_us_per_request", "ratios", "targets")})


if __name__ == "__main__":
    sys.exit(main())
