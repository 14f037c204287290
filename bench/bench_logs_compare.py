"""``ballast logs`` against the tools operators already use, side by side on the same files.

For each size (``--sizes``, by default 100,000 and 1,000,000 lines, written once by
``bench/bench_logs.py``),
each round runs, in a rotating order, on the same warm file:

* ``duckdb_groupby``: one DuckDB group-by projecting two columns (``SELECT event,
  count(*), sum(duration_ms) FROM read_json(...) GROUP BY event``), in this process,
  after one warm-up query: the bar;
* ``ballast_summarize``: ``summarize_file(path)`` in this process (the whole summary:
  every table, percentile and time series), with the default engine (``auto``: the
  native scanner when it was built, as here);
* ``ballast_native``: ``native.summarize_native(path)`` (it fails the run if the engine
  declined the file, so its figure is the native engine's own);
* ``ballast_duckdb``: the same for ``duck.summarize_duckdb(path)``;
* ``ballast_stream``: the streaming engine (``engine="stream"``; default workers, the
  usable cores);
* ``ballast_one_pass``: the streaming engine with ``workers=1``;
* ``ballast_query``: ``ballast logs query`` running the same group-by through its
  ``logs`` view (typed catalogue columns plus the line as JSON), in a child process;
* ``jq``: ``jq -nR 'reduce (inputs | fromjson? | objects) as $l ({}; ...)'`` computing
  the same group-by (count and duration sum per event), in a child process. Plain
  ``jq`` stops at the first malformed line, so ``fromjson?`` is needed to read the file
  at all.

Prints one JSON document: per size and tool, the median seconds over ``--rounds``, and
per size the ratio of each tool to ``duckdb_groupby`` (median of per-round ratios), and
the load average before and after the size's rounds.

    python bench/bench_logs_compare.py [--rounds 3] [--rounds-1m 2] [--sizes 100000,1000000]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

GROUP_BY = "SELECT event, count(*) AS n, sum(duration_ms) AS ms FROM {source} GROUP BY event"
JQ_PROGRAM = (
    "reduce (inputs | fromjson? | objects) as $l ({}; "
    ".[$l.event | tostring] |= {n: ((.n // 0) + 1), ms: ((.ms // 0) + ($l.duration_ms | numbers // 0))})"
)


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def must(report: object) -> object:
    if report is None:
        raise RuntimeError("the engine declined the benchmark log")
    return report


def tools(path: str) -> dict[str, Callable[[], object]]:
    import duckdb

    from ballast.logs import duck, native, summarize_file

    con = duckdb.connect()
    source = f"read_json('{path}', format='newline_delimited', ignore_errors=true, " \
             "columns={event: 'VARCHAR', duration_ms: 'DOUBLE'})"
    sql = GROUP_BY.format(source=source)
    con.execute(sql).fetchall()  # warm-up: the bar is the warm group-by

    def jq() -> object:
        with open(path, "rb") as fh:
            return subprocess.run(["jq", "-nRc", JQ_PROGRAM], stdin=fh, capture_output=True, check=True)

    found: dict[str, Callable[[], object]] = {
        "duckdb_groupby": lambda: con.execute(sql).fetchall(),
        "ballast_summarize": lambda: summarize_file(path),
        "ballast_native": lambda: must(native.summarize_native(path)),
        "ballast_duckdb": lambda: must(duck.summarize_duckdb(path)),
        "ballast_stream": lambda: summarize_file(path, engine="stream"),
        "ballast_one_pass": lambda: summarize_file(path, workers=1, engine="stream"),
        "ballast_query": lambda: subprocess.run(
            [common.PYTHON, "-m", "ballast.logs", "query", GROUP_BY.format(source="logs"), path, "--csv"],
            capture_output=True, check=True),
    }
    if shutil.which("jq"):
        found["jq"] = jq
    return found


def compare(lines: int, rounds: int) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix="ballast-compare-", suffix=".log")
    os.close(fd)
    try:
        common.write_bench_log(lines, path)
        runs = tools(path)
        load_before = os.getloadavg()[0]
        names = list(runs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = common.rotated(names, r)
            for name in order:
                times[name].append(timed(runs[name]))
        ratios = {
            name: round(statistics.median(a / b for a, b in zip(times[name], times["duckdb_groupby"],
                                                                strict=True)), 2)
            for name in names if name != "duckdb_groupby"
        }
        return {
            "lines": lines,
            "bytes": os.path.getsize(path),
            "rounds": rounds,
            "median_s": {name: round(statistics.median(t), 3) for name, t in times.items()},
            "rounds_s": {name: [round(x, 3) for x in t] for name, t in times.items()},
            "ratio_to_duckdb_groupby": ratios,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds at 100k lines")
    parser.add_argument("--rounds-1m", type=int, default=2, help="rounds at 1M lines")
    parser.add_argument("--sizes", default="100000,1000000", help="log sizes in lines, comma-separated")
    args = parser.parse_args(argv)
    info = common.machine()
    try:
        import duckdb  # noqa: F401
    except ImportError:
        skipped = "DuckDB is not installed (pip install -e '.[logs]')"
        return common.finish("logs_compare", {"benchmark": "logs_compare", "machine": info,
                                              "skipped": skipped}, args, f"skipped: {skipped}")
    result = {
        "benchmark": "logs_compare",
        "machine": info,
        "sizes": {str(n): compare(n, args.rounds if n < 1_000_000 else args.rounds_1m)
                  for n in (int(s) for s in args.sizes.split(",") if s)},
    }
    return common.finish("logs_compare", result, args, {k: v for k, v in result.items() if k != "machine"})


if __name__ == "__main__":
    sys.exit(main())
