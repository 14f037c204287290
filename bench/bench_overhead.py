"""Benchmark 1: what the framework and its plugins cost on the cheapest real request.

``GET /v1/sessions/{id}`` is a point read: little work of its own, so whatever the
request path adds shows. Three servers share one SQLite file and run side by side:

* ``all_on``: ``ballast serve`` with the default config (every plugin enabled);
* ``all_off``: the same with every builtin plugin disabled by environment;
* ``metrics_off``: the default config with only the ``metrics`` plugin disabled, so
  ``all_on`` / ``metrics_off`` is what recording and exporting metrics costs;
* ``bare``: :mod:`bench.bare_app`, plain aiohttp with the read on the event loop and
  no logging;
* ``bare_thread`` (for reference): the bare app with the read on a worker thread;
* ``on_asyncio``: ``all_on`` on the stdlib event loop (``server.uvloop = false``);
* with ``--each-off``, ``without_<plugin>`` for each plugin the default config enables:
  the default config with that one plugin disabled, so ``without_<plugin>`` / ``all_on``
  in CPU per request is what that plugin costs on this request;
* with ``--before TREE``, ``before_on`` and ``before_off``: the same two configs run from
  another source tree (an unpacked older commit laid out as an import path: TREE/ballast
  is its framework/, TREE/ballast/plugins its plugins/), for before/after in one run.

"Default plugins" means the default config: whatever plugins it enables, now and as
more are added; "all off" disables every builtin plugin.

Ballast's stdout (one canonical JSON line per request) goes to a file, as it would in
production; the bare app logs nothing. Each round runs wrk against every server in
turn (the order rotates each round); the figures are medians of the rounds, and the
ratios are medians of the per-round ratios.

    python bench/bench_overhead.py [--rounds 5] [--duration 5] [--connections 16]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

SESSION = "bench-overhead"
TARGET_VS_OFF = 0.92
TARGET_VS_BARE = 0.75


def seed_session(origin: str) -> None:
    """A realistic session: title, participants, a few utterances, named speakers."""
    status, body = common.http_json("POST", f"{origin}/v1/sessions", {
        "session_id": SESSION, "title": "Weekly sync",
        "participants": [{"name": "Alice"}, {"name": "Bob"}, {"name": "Chen"}]})
    if status != 201:
        raise RuntimeError(f"could not create the session: {status} {body}")
    mutations = [
        {"id": f"u{i}", "type": "utterance", "speaker": f"spk_{i % 3}", "start_ms": i * 1000,
         "end_ms": i * 1000 + 800, "text": f"utterance number {i}"} for i in range(20)]
    mutations += [{"type": "speaker_renamed", "speaker": "spk_0", "name": "Alice"},
                  {"type": "speaker_renamed", "speaker": "spk_1", "name": "Bob"}]
    status, body = common.http_json("POST", f"{origin}/v1/sessions/{SESSION}/mutations",
                                    {"mutations": mutations})
    if status != 200:
        raise RuntimeError(f"could not seed the session: {status} {body}")


def raw_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def run(rounds: int, duration: float, connections: int, threads: int,
        bare: bool = True, before: str | None = None, each_off: bool = False) -> dict[str, Any]:
    info = common.machine()  # taken before the run: date and load average at its start
    with common.WorkDir("overhead") as work:
        db = work / "bench.db"
        with common.ballast_server(db) as seeder:
            seed_session(seeder.origin)

        servers: dict[str, common.ServerProcess] = {
            "all_on": common.ballast_server(db, stdout=work / "all_on.log"),
            "all_off": common.ballast_server(db, plugins_on=False, stdout=work / "all_off.log"),
            "metrics_off": common.ballast_server(db, stdout=work / "metrics_off.log",
                                                 extra_env={"BALLAST__PLUGINS__METRICS__ENABLED": "false"}),
            "on_asyncio": common.ballast_server(db, stdout=work / "on_asyncio.log",
                                                extra_env={"BALLAST__SERVER__UVLOOP": "false"}),
        }
        for plugin in common.default_on_plugins() if each_off else ():
            servers[f"without_{plugin}"] = common.ballast_server(
                db, stdout=work / f"without_{plugin}.log",
                extra_env={f"BALLAST__PLUGINS__{plugin.upper()}__ENABLED": "false"})
        if before:
            for name, on in (("before_on", True), ("before_off", False)):
                port = common.free_port()
                code = (f"import sys; sys.path.insert(0, {before!r}); "
                        "from ballast.cli import main; sys.exit(main())")
                env = common.ballast_env(db, port, plugins_on=on)
                for key in [k for k in env if k.startswith("BALLAST__PLUGINS__")]:
                    plugin = key.split("__")[2].lower()  # a plugin the older tree lacks
                    if not (Path(before) / "ballast" / "plugins" / f"{plugin}.py").exists():
                        del env[key]
                servers[name] = common.ServerProcess(
                    [common.PYTHON, "-c", code, "serve"], port=port, stdout=work / f"{name}.log", env=env)
        for mode in ("loop", "thread") if bare else ():
            port = common.free_port()
            name = "bare" if mode == "loop" else "bare_thread"
            servers[name] = common.ServerProcess(
                [common.PYTHON, str(common.BENCH_DIR / "bare_app.py"), "--db", str(db), "--port", str(port),
                 "--read", mode], port=port)
        try:
            for server in servers.values():
                server.start()
            path = f"/v1/sessions/{SESSION}"
            bodies = {name: raw_get(s.origin + path) for name, s in servers.items()}
            same_body = len({json.dumps(json.loads(b), sort_keys=True) for b in bodies.values()}) == 1
            if not same_body:
                raise RuntimeError(f"the servers answer different bodies: {bodies}")
            # This tree's servers and the bare app answer the very same bytes.
            same_bytes = len({b for n, b in bodies.items() if not n.startswith("before_")}) == 1
            for server in servers.values():  # warm-up: imports, caches, connections
                common.wrk(server.origin + path, threads=threads, connections=connections, duration_s=1)

            names = list(servers)
            per_round: list[dict[str, Any]] = []
            for r in range(rounds):
                order = common.rotated(names, r)
                row: dict[str, Any] = {}
                for name in order:
                    row[name] = common.wrk_cpu(servers[name], path, threads=threads,
                                               connections=connections, duration_s=duration)
                row["order"] = order
                per_round.append(row)
                common.print_round(r, rounds, row, names)
            rss = {name: s.status() for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        log_lines = sum(1 for _ in (work / "all_on.log").open("rb"))

    def med(name: str, key: str) -> float:
        return common.median([row[name][key] for row in per_round])

    def ratio(a: str, b: str) -> float:
        return common.median([row[a]["rps"] / row[b]["rps"] for row in per_round])

    def cpu_ratio(a: str, b: str) -> float:
        """Requests per CPU-second of ``a`` over ``b``: steadier than rps on a busy machine."""
        return round(common.median([row[b]["cpu_us_per_request"] / row[a]["cpu_us_per_request"]
                                    for row in per_round]), 3)

    errors = {name: sum(row[name]["errors"] for row in per_round) for name in names}
    if not bare:  # --without-bare: only the ballast servers, compared with each other
        return {
            "benchmark": "overhead", "machine": info,
            "method": {"request": f"GET {path}", "tool": "wrk", "threads": threads,
                       "connections": connections, "duration_s": duration, "rounds": rounds},
            "median_rps": {name: round(med(name, "rps"), 1) for name in names},
            "median_cpu_us_per_request": {name: round(med(name, "cpu_us_per_request"), 1) for name in names},
            "errors": errors,
            "ratios": {"all_on_vs_all_off": round(ratio("all_on", "all_off"), 3),
                       "all_on_vs_metrics_off": round(ratio("all_on", "metrics_off"), 3)},
            "targets": {}, "rounds": per_round,
        }
    on_off, on_bare = ratio("all_on", "all_off"), ratio("all_on", "bare")
    return {
        "benchmark": "overhead",
        "machine": info,
        "method": {
            "request": f"GET {path}", "tool": "wrk", "threads": threads,
            "connections": connections, "duration_s": duration, "rounds": rounds,
            "ballast_stdout": "redirected to a file (one http.request JSON line per request)",
            "bare_app": "bench/bare_app.py: plain aiohttp, read on the event loop, no logging",
            "same_body": same_body, "same_bytes": same_bytes, "body_bytes": len(bodies["all_on"]),
        },
        "median_rps": {name: round(med(name, "rps"), 1) for name in names},
        "median_cpu_us_per_request": {name: round(med(name, "cpu_us_per_request"), 1) for name in names},
        "median_p50_ms": {name: round(med(name, "p50_ms"), 3) for name in names},
        "median_p99_ms": {name: round(med(name, "p99_ms"), 3) for name in names},
        "errors": errors,
        "ratios": {
            "all_on_vs_all_off": round(on_off, 3),
            "all_on_vs_bare": round(on_bare, 3),
            "all_on_vs_bare_thread": round(ratio("all_on", "bare_thread"), 3),
            "all_off_vs_bare": round(ratio("all_off", "bare"), 3),
            "all_on_vs_metrics_off": round(ratio("all_on", "metrics_off"), 3),
            "all_on_vs_on_asyncio": round(ratio("all_on", "on_asyncio"), 3),
            **{f"all_on_vs_{n}": round(ratio("all_on", n), 3) for n in names if n.startswith("without_")},
            **({"before_on_vs_before_off": round(ratio("before_on", "before_off"), 3),
                "all_on_vs_before_on": round(ratio("all_on", "before_on"), 3),
                "all_off_vs_before_off": round(ratio("all_off", "before_off"), 3)} if before else {}),
        },
        "cpu_ratios": {
            "all_on_vs_all_off": cpu_ratio("all_on", "all_off"),
            "all_on_vs_bare": cpu_ratio("all_on", "bare"),
            "all_on_vs_on_asyncio": cpu_ratio("all_on", "on_asyncio"),
            **{f"all_on_vs_{n}": cpu_ratio("all_on", n) for n in names if n.startswith("without_")},
            **({"before_on_vs_before_off": cpu_ratio("before_on", "before_off"),
                "all_on_vs_before_on": cpu_ratio("all_on", "before_on")} if before else {}),
        },
        "targets": {
            "all_on_vs_all_off": {"target": f">= {TARGET_VS_OFF}", "measured": round(on_off, 3),
                                  "result": common.verdict(on_off >= TARGET_VS_OFF)},
            "all_on_vs_bare": {"target": f">= {TARGET_VS_BARE}", "measured": round(on_bare, 3),
                               "result": common.verdict(on_bare >= TARGET_VS_BARE)},
        },
        "server_rss_kb": rss,
        "all_on_log_lines": log_lines,
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=5, duration=5.0, connections=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", help="a source tree to run as before_on / before_off")
    parser.add_argument("--each-off", action="store_true",
                        help="also the default config with each default-on plugin disabled alone")
    parser.add_argument("--without-bare", action="store_true",
                        help="only the ballast servers (implies --no-write)")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.duration, args.connections, args.threads,
                 bare=not args.without_bare, before=args.before, each_off=args.each_off)
    if args.without_bare:
        args.no_write = True
        shown = ("median_rps", "median_cpu_us_per_request", "ratios")
    else:
        shown = ("median_rps", "median_cpu_us_per_request", "ratios", "cpu_ratios", "targets")
    return common.finish("overhead", result, args, {k: result[k] for k in shown})


if __name__ == "__main__":
    sys.exit(main())
