"""Benchmark 4: the retry plugin against an upstream that fails at random, and one that is down.

The upstream is the test suite's fake (``tests/fake_upstream.py``), in process, over real
loopback HTTP. The fake plays a script of steps, one per request; fault injection is a
script drawn independently per attempt from a seeded generator: ``503`` with
probability ``p``, else a valid completion. "Hard down" answers 503 to everything.

The calls go through exactly what the server uses: settings from
``config/default.toml`` plus environment overrides (``ballast.config.load_settings``),
the plugins (``ballast.plugin_manager.load_plugins``), the ``ballast_upstream_call`` hook
given the ``ballast_client_provider`` hook's shared client, composed with the
``ballast_upstream_wrappers``. Only the backoff is shortened (5 ms start, 20 ms cap) so
a run takes seconds; attempts stay at the default 3. 1,000 logical calls per round, 20
at a time; each fault rate runs several rounds with different fixed seeds.

Reported per scenario: success rate, upstream attempts per logical call (the fake's
count / calls), and the attempts each call reported (``UpstreamResponse.attempts`` or
``UpstreamError.attempts``).

    python bench/bench_retry.py [--calls 1000] [--rounds 5]
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ballast.telemetry import Telemetry

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

BACKOFF = {"START_TIMEOUT_S": "0.005", "FACTOR": "2", "MAX_TIMEOUT_S": "0.02"}
CONCURRENCY = 20
TARGETS = {0.1: {"success": 0.999, "attempts": 1.12}, 0.3: {"attempts": 1.45}}


def expected(p: float, attempts: int) -> dict[str, float]:
    """Attempts per call and success rate for independent faults with probability ``p``."""
    return {"attempts_per_call": sum(p ** k for k in range(attempts)),
            "success_rate": 1 - p ** attempts}


async def scenario(p: float | None, calls: int, seed: int) -> dict[str, Any]:
    """``p`` is the fault probability; ``None`` means hard down (always 503)."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from fake_upstream import FakeUpstream, Step

    from ballast import logging as blog
    from ballast.config import load_settings
    from ballast.errors import UpstreamError
    from ballast.plugin_manager import load_plugins
    from ballast.upstream import UpstreamRequest, build_upstream

    blog.configure("json", "critical")  # the retry log lines are not what is measured here
    environ = {f"BALLAST__PLUGINS__RETRY__{k}": v for k, v in BACKOFF.items()}
    # Per-call retrying only: the protections that remember across calls (breaker, retry
    # budget) are measured by bench_outage.py.
    environ |= {"BALLAST__PLUGINS__RETRY__BUDGET": "false",
                "BALLAST__PLUGINS__CIRCUIT_BREAKER__ENABLED": "false"}
    config = load_settings(environ=environ)
    plugins = load_plugins(config)
    upstream = build_upstream(plugins.hook, config, Telemetry())
    provider, call = upstream.provider, upstream.request
    attempts_setting = config.plugin("retry").attempts

    rng = random.Random(seed)
    fault = Step.status(503)
    default = fault if p is None else Step.ok({"ok": True})
    async with FakeUpstream(default=default) as fake:
        if p is not None:
            # One draw per possible attempt: enough that the script never runs out.
            fake.script(*(fault if rng.random() < p else Step.ok({"ok": True})
                          for _ in range(calls * attempts_setting)))
        url = f"{fake.base_url}/chat/completions"
        gate = asyncio.Semaphore(CONCURRENCY)
        per_call: list[tuple[bool, int]] = []
        failures: Counter[str] = Counter()

        async def one(i: int) -> None:
            request = UpstreamRequest("POST", url, name="bench", attempt_timeout_s=10.0,
                                      json={"model": "bench", "messages": [
                                          {"role": "user", "content": f"call {i}"}]})
            async with gate:
                try:
                    response = await call(request)
                except UpstreamError as exc:
                    per_call.append((False, exc.attempts or 0))
                    failures[f"{exc.kind}:{exc.upstream_status}:{exc.attempts}"] += 1
                else:
                    per_call.append((response.status == 200, response.attempts))

        try:
            await asyncio.gather(*(one(i) for i in range(calls)))
        finally:
            await provider.close()
        upstream_attempts = fake.attempts

    ok = sum(1 for success, _ in per_call if success)
    reported = Counter(n for _, n in per_call)
    return {
        "fault_rate": "hard_down" if p is None else p,
        "seed": seed,
        "calls": calls,
        "succeeded": ok,
        "success_rate": ok / calls,
        "upstream_attempts": upstream_attempts,
        "attempts_per_call": upstream_attempts / calls,
        "reported_attempts_histogram": {str(k): v for k, v in sorted(reported.items())},
        # kind:upstream_status:attempts of each failed call
        "failures": dict(sorted(failures.items())),
        "max_attempts_per_call": max(reported),
        "min_attempts_per_call": min(reported),
        "attempts_setting": attempts_setting,
    }


def run(calls: int, rounds: int, base_seed: int) -> dict[str, Any]:
    info = common.machine()  # taken before the run: date and load average at its start
    scenarios: dict[str, Any] = {}
    for p in (0.1, 0.3, None):
        name = "hard_down" if p is None else f"p{int(p * 100)}"
        n_rounds = 1 if p is None else rounds
        runs = [asyncio.run(scenario(p, calls, base_seed + r)) for r in range(n_rounds)]
        for x in runs:
            print(f"{name} seed {x['seed']}: success {x['success_rate']:.4f}, "
                  f"{x['attempts_per_call']:.3f} attempts/call", file=sys.stderr)
        total_calls = sum(x["calls"] for x in runs)
        scenarios[name] = {
            "rounds": n_rounds,
            "median_success_rate": common.median([x["success_rate"] for x in runs]),
            "median_attempts_per_call": round(common.median([x["attempts_per_call"] for x in runs]), 4),
            "pooled_success_rate": sum(x["succeeded"] for x in runs) / total_calls,
            "pooled_attempts_per_call": round(sum(x["upstream_attempts"] for x in runs) / total_calls, 4),
            "expected": None if p is None else {
                k: round(v, 4) for k, v in expected(p, runs[0]["attempts_setting"]).items()},
            "runs": runs,
        }

    p10, p30, down = scenarios["p10"], scenarios["p30"], scenarios["hard_down"]
    down_run = down["runs"][0]
    exact = (down_run["min_attempts_per_call"] == down_run["max_attempts_per_call"]
             == down_run["attempts_setting"]
             and down_run["upstream_attempts"] == down_run["attempts_setting"] * down_run["calls"])
    targets = {
        "p10_success_rate": {"target": ">= 0.999", "measured": p10["median_success_rate"],
                             "result": common.verdict(p10["median_success_rate"] >= 0.999)},
        "p10_attempts_per_call": {"target": "<= 1.12", "measured": p10["median_attempts_per_call"],
                                  "result": common.verdict(p10["median_attempts_per_call"] <= 1.12)},
        "p30_attempts_per_call": {"target": "<= 1.45", "measured": p30["median_attempts_per_call"],
                                  "result": common.verdict(p30["median_attempts_per_call"] <= 1.45)},
        "hard_down_attempts": {
            "target": f"exactly {down_run['attempts_setting']} per call",
            "measured": f"min {down_run['min_attempts_per_call']}, max "
                        f"{down_run['max_attempts_per_call']}, "
                        f"{down_run['attempts_per_call']:.3f} per call",
            "result": common.verdict(exact)},
    }
    return {
        "benchmark": "retry",
        "machine": info,
        "method": {
            "upstream": "tests/fake_upstream.py FakeUpstream in process, script of independent "
                        "draws (503 with probability p, else ok)",
            "client": "load_settings + load_plugins; ballast.upstream.build_upstream (the "
                      "server's outbound pipeline), circuit_breaker and retry budget off",
            "overrides": {f"plugins.retry.{k.lower()}": float(v) for k, v in BACKOFF.items()},
            "calls_per_round": calls, "concurrency": CONCURRENCY,
            "seeds": list(range(base_seed, base_seed + rounds)),
        },
        "scenarios": scenarios,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1, help="first seed; round r uses seed + r")
    args = parser.parse_args(argv)
    result = run(args.calls, args.rounds, args.seed)
    summary = {name: {k: v for k, v in s.items() if k != "runs"} for name, s in result["scenarios"].items()}
    return common.finish("retry", result, args, {"scenarios": summary, "targets": result["targets"]})


if __name__ == "__main__":
    sys.exit(main())
