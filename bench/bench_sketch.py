"""The summary's latency sketch against ``ddsketch`` and ``hdrhistogram``: speed and accuracy.

Reads the ``duration_ms`` of every ``http.request`` line of a log written by
``bench/bench_logs.py`` and feeds them, in file order, to

* ``LatencySketch.add`` (ballast's own, one method call per value),
* the same sketch updated inline, as the summary's hot loop does,
* ``ddsketch.DDSketch(relative_accuracy=0.01)`` (``add``),
* ``hdrh.histogram.HdrHistogram(1, 86_400_000_000, 2)`` over microseconds (``record_value``),

then writes ``bench/results/sketch.json``: seconds per million values (median of
``--rounds``) and the relative error of p50 / p95 / p99 / p99.9 against the exact
nearest-rank value. Without ``--log`` it writes a ``--lines`` log first. A candidate
whose library is not installed (``pip install ddsketch hdrhistogram``) is recorded as
skipped.

    python bench/bench_sketch.py --log /tmp/b1m.log   # a log kept with bench_logs.py --keep
    python bench/bench_sketch.py --lines 1000000      # writes (and removes) its own log
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

QS = (0.5, 0.95, 0.99, 0.999)


def durations(path: str) -> list[float]:
    out: list[float] = []
    with open(path, "rb") as fh:
        for line in fh:
            if b'"http.request"' not in line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            value = obj.get("duration_ms")
            if isinstance(value, (int, float)) and value >= 0:
                out.append(float(value))
    return out


def exact(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[max(1, math.ceil(q * len(ordered))) - 1] for q in QS]


def ballast_add(values: list[float]) -> list[float]:
    from ballast.logs import LatencySketch

    sketch = LatencySketch()
    add = sketch.add
    for v in values:
        add(v)
    return [float(x or 0.0) for x in sketch.quantiles(QS)]


def ballast_inline(values: list[float]) -> list[float]:
    from ballast.logs import LatencySketch
    from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS

    sketch = LatencySketch()
    buckets = sketch.buckets
    log, ceil, inv, low = math.log, math.ceil, _INV_LOG_GAMMA, _MIN_MS
    for v in values:
        if v >= low:
            i = ceil(log(v) * inv)
            buckets[i] = buckets.get(i, 0) + 1
        else:
            sketch.zeros += 1
        if v > sketch.max:
            sketch.max = v
    return [float(x or 0.0) for x in sketch.quantiles(QS)]


def ddsketch(values: list[float]) -> list[float]:
    from ddsketch import DDSketch

    sketch = DDSketch(relative_accuracy=0.01)
    add = sketch.add
    for v in values:
        add(v)
    return [float(sketch.get_quantile_value(q) or 0.0) for q in QS]


def hdrhistogram(values: list[float]) -> list[float]:
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(1, 86_400_000_000, 2)
    record = hist.record_value
    for v in values:
        record(max(1, round(v * 1000)))
    return [hist.get_value_at_percentile(q * 100) / 1000 for q in QS]


CANDIDATES: dict[str, Callable[[list[float]], list[float]]] = {
    "ballast_inline": ballast_inline,
    "ballast_add": ballast_add,
    "ddsketch": ddsketch,
    "hdrhistogram": hdrhistogram,
}


#: candidate -> the module it needs, and how to install it
NEEDS: dict[str, tuple[str, str]] = {"ddsketch": ("ddsketch", "pip install ddsketch"),
                                     "hdrhistogram": ("hdrh", "pip install hdrhistogram")}


def read_durations(log: str | None, lines: int) -> tuple[list[float], str]:
    if log:
        return durations(log), log
    fd, path = tempfile.mkstemp(prefix="ballast-sketch-", suffix=".log")
    os.close(fd)
    try:
        common.write_bench_log(lines, path)
        return durations(path), f"bench_logs.py, {lines} lines"
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3)
    parser.add_argument("--log", help="a log kept with bench_logs.py --keep")
    parser.add_argument("--lines", type=int, default=1_000_000,
                        help="lines of the log to write when there is no --log")
    args = parser.parse_args(argv)
    info = common.machine()
    values, source = read_durations(args.log, args.lines)
    truth = exact(values)
    result: dict[str, Any] = {"benchmark": "sketch", "machine": info, "log": source, "values": len(values),
                              "exact": dict(zip(map(str, QS), truth, strict=True))}
    for name, run in CANDIDATES.items():
        module, install = NEEDS.get(name, ("ballast", ""))
        try:
            __import__(module)
        except ImportError:
            result[name] = {"skipped": f"not installed ({install})"}
            continue
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            got = run(values)
            times.append(time.perf_counter() - started)
        errors = [abs(g - t) / t if t else abs(g) for g, t in zip(got, truth, strict=True)]
        result[name] = {
            "s_per_million": round(statistics.median(times) / len(values) * 1e6, 3),
            "max_rel_error": round(max(errors), 5),
            "rel_error": dict(zip(map(str, QS), (round(e, 5) for e in errors), strict=True)),
        }
    return common.finish("sketch", result, args, {k: v for k, v in result.items() if k != "machine"})


if __name__ == "__main__":
    sys.exit(main())
