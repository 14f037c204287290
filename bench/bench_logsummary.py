"""Benchmark 5: ``ballast logs summarize`` throughput and memory, at two file sizes.

Runs ``bench/bench_logs.py`` (which writes a synthetic log with the server's event mix
and summarises it, reporting lines/s and its own peak RSS) once on a 100,000-line log
and once on a 1,000,000-line log, each in a fresh process, and compares them: the
throughput target is read on the large file, and memory "not growing with file size"
means the peak RSS of the 1M run is within 10% (and 10 MB) of the 100k run's.

    python bench/bench_logsummary.py [--rounds 3]
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

TARGET_LINES_PER_S = 100_000
SIZES = (100_000, 1_000_000)


def summarize(lines: int, rounds: int) -> dict[str, Any]:
    script = common.BENCH_DIR / "bench_logs.py"
    proc = subprocess.run([common.PYTHON, str(script), "--lines", str(lines), "--rounds", str(rounds)],
                          capture_output=True, text=True, timeout=1800)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"bench_logs.py printed no result (exit {proc.returncode}): "
                       f"{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")


def run(rounds: int) -> dict[str, Any]:
    info = common.machine()  # taken before the run: date and load average at its start
    script = common.BENCH_DIR / "bench_logs.py"
    if not script.exists():
        return {"benchmark": "logs", "machine": info, "skipped": "bench/bench_logs.py does not exist",
                "targets": {}}
    by_size = {str(n): summarize(n, rounds) for n in SIZES}
    small, big = by_size[str(SIZES[0])], by_size[str(SIZES[1])]
    rate = big["lines_per_s"]
    growth = big["peak_rss_mb"] - small["peak_rss_mb"]
    flat = growth <= max(10.0, 0.10 * small["peak_rss_mb"])
    return {
        "benchmark": "logs",
        "machine": info,
        "method": {
            "tool": "bench/bench_logs.py (owned separately), median of its rounds per file",
            "rounds": rounds, "sizes": list(SIZES),
            "memory": "peak RSS (getrusage) of the summarising process; the log is written by "
                      "a forked child",
        },
        "sizes": by_size,
        "peak_rss_growth_mb_100k_to_1m": round(growth, 1),
        "targets": {
            "lines_per_s_1m": {"target": f">= {TARGET_LINES_PER_S}", "measured": rate,
                               "result": common.verdict(rate >= TARGET_LINES_PER_S)},
            "memory_flat": {
                "target": "peak RSS at 1M within max(10 MB, 10%) of 100k",
                "measured": f"{small['peak_rss_mb']} MB -> {big['peak_rss_mb']} MB",
                "result": common.verdict(flat)},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3)
    args = parser.parse_args(argv)
    result = run(args.rounds)
    return common.finish("logs", result, args, {k: v for k, v in result.items() if k != "machine"})


if __name__ == "__main__":
    sys.exit(main())
