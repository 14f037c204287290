"""Run every benchmark, then write ``bench/results/summary.json`` and ``summary.md``.

Each benchmark runs in its own process (one crashing does not stop the rest) and writes
its file in ``bench/results/``; the summary collects every target with its measured
value and MET or MISSED. Missing a target is not an error: the exit status is non-zero
only when a benchmark failed to run. Every ``bench_*.py`` script is listed below
(``bench_logs.py`` is the log writer and summariser that ``logs`` runs).

    python bench/run_all.py               # everything, the recorded rounds (about 45 minutes)
    python bench/run_all.py --quick       # fewer, shorter rounds: a smoke run
    python bench/run_all.py --only overhead,retry
    python bench/run_all.py --list        # the benchmarks and their commands
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common


class Benchmark(NamedTuple):
    script: str
    full: list[str]  # the arguments of the recorded runs
    quick: list[str]  # a smoke run
    timeout_s: int
    results: str  # the file it writes in bench/results/, without .json


#: In the order of bench/README.md's sections.
BENCHMARKS: dict[str, Benchmark] = {
    "overhead": Benchmark("bench_overhead.py", ["--rounds", "5", "--duration", "5"],
                          ["--rounds", "2", "--duration", "3"], 900, "overhead"),
    "ingest": Benchmark("bench_ingest.py", ["--rounds", "5", "--duration", "5"],
                        ["--rounds", "1", "--duration", "3"], 900, "ingest"),
    "naive": Benchmark("bench_naive.py", ["--rounds", "3", "--duration", "4"],
                       ["--rounds", "1", "--duration", "2"], 900, "naive_ingest"),
    "finalize": Benchmark("bench_finalize.py", ["--sizes", "10000,100000,1000000", "--rounds", "3"],
                          ["--sizes", "10000,100000", "--rounds", "1"], 2400, "finalize"),
    "retry": Benchmark("bench_retry.py", ["--rounds", "5"], ["--rounds", "1"], 900, "retry"),
    "outage": Benchmark("bench_outage.py", ["--duration", "24"], ["--duration", "8"], 900, "outage"),
    "overload": Benchmark("bench_overload.py", ["--seconds", "3", "--rounds", "1"],
                          ["--seconds", "1", "--rounds", "1"], 900, "overload"),
    "logs": Benchmark("bench_logsummary.py", ["--rounds", "3"], ["--rounds", "1"], 1800, "logs"),
    "logs_compare": Benchmark("bench_logs_compare.py", ["--rounds", "3", "--rounds-1m", "2"],
                              ["--sizes", "100000", "--rounds", "1"], 2400, "logs_compare"),
    "sketch": Benchmark("bench_sketch.py", ["--lines", "1000000", "--rounds", "3"],
                        ["--lines", "100000", "--rounds", "1"], 1200, "sketch"),
    "auth": Benchmark("bench_auth.py", ["--rounds", "3", "--duration", "5"],
                      ["--rounds", "1", "--duration", "3"], 600, "auth"),
    "participants": Benchmark("bench_participants.py", ["--participants", "150000", "--rounds", "3"],
                              ["--participants", "20000", "--rounds", "1"], 900, "participants"),
    "waiters": Benchmark("bench_waiters.py", ["--rounds", "5", "--duration", "3"],
                         ["--rounds", "1", "--duration", "2"], 600, "waiters"),
    "scaleout": Benchmark("bench_scaleout.py", ["--rounds", "5", "--duration", "4"],
                          ["--rounds", "1", "--duration", "3"], 1800, "scaleout"),
}


def argv_of(name: str, quick: bool) -> list[str]:
    b = BENCHMARKS[name]
    return [common.PYTHON, str(common.BENCH_DIR / b.script), *(b.quick if quick else b.full)]


def shown(name: str, quick: bool) -> str:
    """The command as bench/README.md writes it."""
    b = BENCHMARKS[name]
    return " ".join(["python", f"bench/{b.script}", *(b.quick if quick else b.full)])


def run_one(name: str, quick: bool) -> dict[str, Any]:
    timeout = BENCHMARKS[name].timeout_s
    argv = argv_of(name, quick)
    print(f"== {name}: {shown(name, quick)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, timeout=timeout, stdout=subprocess.PIPE, text=True)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout} s"
    seconds = round(time.monotonic() - started, 1)
    path = common.RESULTS_DIR / f"{BENCHMARKS[name].results}.json"
    result = json.loads(path.read_text()) if status == "ok" and path.exists() else None
    return {"status": status, "seconds": seconds, "command": shown(name, quick),
            "result": result}


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark summary ({summary['machine']['date']})",
        "",
        f"Machine: {summary['machine']['nproc']} x {summary['machine']['cpu_model']}, Python "
        f"{summary['machine']['python']}; load average (1, 5, 15 min) at start "
        f"{summary['machine']['loadavg_1_5_15min']}, at end {summary['loadavg_at_end']}.",
        f"Command: `{summary['command']}`; finished {summary['finished']}.",
        "",
        "| benchmark | target | required | measured | result |",
        "|---|---|---|---|---|",
    ]
    for name, entry in summary["benchmarks"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | (did not run: {entry['status']}) | | | |")
            continue
        result = entry["result"] or {}
        if result.get("skipped"):
            lines.append(f"| {name} | (skipped: {result['skipped']}) | | | |")
        for target, t in result.get("targets", {}).items():
            lines.append(f"| {name} | {target} | {t['target']} | {t['measured']} | {t['result']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, write=False)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="print each benchmark's command and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name:<13} {shown(name, args.quick)}  -> results/{BENCHMARKS[name].results}.json")
        return 0
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")

    info = common.machine()
    command = "python bench/run_all.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    results = {name: run_one(name, args.quick) for name in names}
    # With --only, the other benchmarks' last results stay in the summary, marked as such.
    for name in BENCHMARKS:
        path = common.RESULTS_DIR / f"{BENCHMARKS[name].results}.json"
        if name not in results and path.exists():
            earlier = json.loads(path.read_text())
            results[name] = {"status": "ok", "seconds": None, "result": earlier,
                             "command": f"(not rerun: results of {earlier['machine']['date']})"}
    results = {name: results[name] for name in BENCHMARKS if name in results}
    summary = {
        "machine": info,
        "finished": common.machine()["date"],
        "loadavg_at_end": common.machine()["loadavg_1_5_15min"],
        "command": command,
        "benchmarks": {
            name: {"status": r["status"], "seconds": r["seconds"], "command": r["command"],
                   "targets": (r["result"] or {}).get("targets", {})}
            for name, r in results.items()},
    }
    common.write_result("summary", summary)
    md = table({**summary, "benchmarks": results})
    (common.RESULTS_DIR / "summary.md").write_text(md)
    print(md)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
