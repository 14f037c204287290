"""Benchmark 6: what an upstream outage costs the upstream and the clients, protections on vs off.

The upstream is the test suite's fake (``tests/fake_upstream.py``), in process, over real
loopback HTTP. Three upstream behaviours:

* ``hard_down``: 503 to everything;
* ``flapping_Ns``: down (503) and up in turns, N seconds each (50 % of the time down),
  for each N in ``--flap-s`` (one period shorter than the breaker's 5 s break, one not);
* ``p50``: each attempt fails (503) with probability 0.5 (flapping attempt by attempt);
* ``p10``: each attempt fails (503) with probability 0.1 (drawn from a seeded generator).

Calls go through exactly the server's outbound pipeline (``ballast.upstream.build_upstream``
over ``load_settings`` + ``load_plugins``, i.e. ``config/default.toml``), with the default
backoff, in two configurations run side by side in the same process:

* ``on``: as shipped: circuit breaker and retry budget on;
* ``off``: ``plugins.circuit_breaker.enabled = false`` and ``plugins.retry.budget = false``
  (retrying without either protection: every call retries on its own).

Load is open-loop: ``--rate`` calls per second for ``--duration`` seconds, each call
under a 30 s time budget (the default ``request_ms``), so a slow failure does not slow
the arrivals (as with real clients). Reported per scenario and configuration: upstream
attempts per call (the fake's count / calls), success rate, and the latency of a
logical call as its caller sees it (p50, p99).

    python bench/bench_outage.py [--rate 100] [--duration 24] [--flap-s 2,6] [--seed 1]
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

CONFIGS: dict[str, dict[str, str]] = {
    "on": {},
    "off": {"BALLAST__PLUGINS__CIRCUIT_BREAKER__ENABLED": "false",
            "BALLAST__PLUGINS__RETRY__BUDGET": "false"},
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(name: str, config_name: str, *, rate: float, duration: float, flap_s: float,
                   seed: int) -> dict[str, Any]:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from fake_upstream import FakeUpstream, Step

    from ballast import logging as blog
    from ballast.budget import Deadline, deadline_scope
    from ballast.config import load_settings
    from ballast.errors import UpstreamError
    from ballast.plugin_manager import load_plugins
    from ballast.telemetry import Telemetry
    from ballast.upstream import UpstreamRequest, build_upstream

    blog.configure("json", "critical")  # log lines are not what is measured here
    config = load_settings(environ=dict(CONFIGS[config_name]))
    upstream = build_upstream(load_plugins(config).hook, config, Telemetry())
    fault, ok = Step.status(503), Step.ok({"ok": True})
    calls = int(rate * duration)
    rng = random.Random(seed)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}

    p = {"p10": 0.1, "p50": 0.5}.get(name)
    async with FakeUpstream(default=fault if p is None else ok) as fake:
        if p is not None:
            fake.script(*(fault if rng.random() < p else ok for _ in range(calls * 3)))
        url = f"{fake.base_url}/chat/completions"

        async def flap() -> None:
            down = True
            while True:
                fake.default = fault if down else ok
                await asyncio.sleep(flap_s)
                down = not down

        async def one(i: int) -> None:
            body = {"model": "bench", "messages": [{"role": "user", "content": str(i)}]}
            request = UpstreamRequest("POST", url, name="bench", upstream="openai", attempt_timeout_s=20,
                                      json=body)
            t0 = time.perf_counter()
            with deadline_scope(Deadline.after(30.0)):
                try:
                    response = await upstream.request(request)
                    outcome = "ok" if response.status == 200 else f"status {response.status}"
                except UpstreamError as exc:
                    outcome = f"{exc.status} {exc.kind}"
            latencies.append(time.perf_counter() - t0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        flapper = asyncio.create_task(flap()) if name.startswith("flapping") else None
        started = time.perf_counter()
        tasks = []
        for i in range(calls):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        if flapper is not None:
            flapper.cancel()
        attempts = fake.attempts
    await upstream.close()
    return {
        "scenario": name, "config": config_name, "calls": calls,
        "upstream_attempts": attempts,
        "attempts_per_call": round(attempts / calls, 3),
        "success_rate": round(outcomes.get("ok", 0) / calls, 4),
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "outcomes": dict(sorted(outcomes.items())),
    }


def run(rate: float, duration: float, flaps: list[float], seed: int) -> dict[str, Any]:
    info = common.machine()
    rows = []
    plan = [("hard_down", 0.0), *((f"flapping_{f:g}s", f) for f in flaps), ("p50", 0.0), ("p10", 0.0)]
    for name, flap_s in plan:
        for config_name in CONFIGS:
            row = asyncio.run(scenario(name, config_name, rate=rate, duration=duration, flap_s=flap_s,
                                       seed=seed))
            print(f"{name:<10} {config_name:<3} attempts/call {row['attempts_per_call']:.3f}  "
                  f"success {row['success_rate']:.3f}  p50 {row['latency_p50_ms']:.1f} ms  "
                  f"p99 {row['latency_p99_ms']:.1f} ms", file=sys.stderr)
            rows.append(row)
    by = {(r["scenario"], r["config"]): r for r in rows}
    down_on, down_off = by[("hard_down", "on")], by[("hard_down", "off")]
    p10_on, p10_off = by[("p10", "on")], by[("p10", "off")]
    targets = {
        "hard_down_attempts_per_call_on": {
            "target": "<= 0.2 (a few probes per break)", "measured": down_on["attempts_per_call"],
            "result": common.verdict(down_on["attempts_per_call"] <= 0.2)},
        "hard_down_p50_on_vs_off": {
            "target": "fail fast: p50 on <= 1/10 of off",
            "measured": f"{down_on['latency_p50_ms']} ms vs {down_off['latency_p50_ms']} ms",
            "result": common.verdict(down_on["latency_p50_ms"] * 10 <= down_off["latency_p50_ms"])},
        "p10_success_unchanged": {
            "target": "on >= off - 0.005 (protections cost nothing at a 10 % fault rate)",
            "measured": f"{p10_on['success_rate']} vs {p10_off['success_rate']}",
            "result": common.verdict(p10_on["success_rate"] >= p10_off["success_rate"] - 0.005)},
    }
    return {
        "benchmark": "outage",
        "machine": info,
        "method": {
            "upstream": "tests/fake_upstream.py FakeUpstream in process: hard_down (503 always), "
                        f"flapping (N s down / N s up, N in {flaps}), p50 and p10 (independent 503 "
                        "draws per attempt, p = 0.5 and 0.1)",
            "client": "load_settings + load_plugins + ballast.upstream.build_upstream; default "
                      "settings (backoff 0.5 s x2, 3 attempts); 'off' disables the breaker and "
                      "the retry budget",
            "load": f"open loop, {rate} calls/s for {duration} s, 30 s budget per call",
            "seed": seed,
        },
        "rows": rows,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second")
    parser.add_argument("--duration", type=float, default=24.0, help="seconds of arrivals per scenario")
    parser.add_argument("--flap-s", default="2,6", help="lengths of the down and up phases, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.rate, args.duration, [float(f) for f in args.flap_s.split(",")], args.seed)
    return common.finish("outage", result, args, {
        "rows": [{k: v for k, v in r.items() if k != "outcomes"} for r in result["rows"]],
        "targets": result["targets"]})


if __name__ == "__main__":
    raise SystemExit(main())
