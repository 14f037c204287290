"""Run every benchmark, then write ``bench/results/summary.json`` and ``summary.md``.

Each benchmark runs in its own process (one crashing does not stop the rest) and writes
``bench/results/<name>.json``; the summary collects every target with its measured
value and MET or MISSED. Missing a target is not an error: the exit status is non-zero
only when a benchmark failed to run.

    python bench/run_all.py               # everything, default rounds (about 15 minutes)
    python bench/run_all.py --quick       # fewer, shorter rounds: a smoke run
    python bench/run_all.py --only overhead,retry
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

#: name -> (script, full arguments, quick arguments, timeout in seconds)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], int]] = {
    "overhead": ("bench_overhead.py", ["--rounds", "5", "--duration", "5"],
                 ["--rounds", "2", "--duration", "3"], 900),
    "ingest": ("bench_ingest.py", ["--rounds", "5", "--duration", "5"],
               ["--rounds", "1", "--duration", "3"], 900),
    "finalize": ("bench_finalize.py", ["--sizes", "10000,100000,1000000", "--rounds", "3"],
                 ["--sizes", "10000,100000", "--rounds", "1"], 2400),
    "retry": ("bench_retry.py", ["--rounds", "5"], ["--rounds", "1"], 900),
    "outage": ("bench_outage.py", ["--duration", "24"], ["--duration", "8"], 900),
    "logs": ("bench_logsummary.py", ["--rounds", "3"], ["--rounds", "1"], 1800),
    "auth": ("bench_auth.py", ["--rounds", "3", "--duration", "5"],
             ["--rounds", "1", "--duration", "3"], 600),
    "scaleout": ("bench_scaleout.py", ["--rounds", "5", "--duration", "4"],
                 ["--rounds", "1", "--duration", "3"], 1800),
}


def run_one(name: str, quick: bool) -> dict[str, Any]:
    script, full, short, timeout = BENCHMARKS[name]
    argv = [common.PYTHON, str(common.BENCH_DIR / script), *(short if quick else full)]
    print(f"== {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, timeout=timeout, stdout=subprocess.PIPE, text=True)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout} s"
    seconds = round(time.monotonic() - started, 1)
    path = common.RESULTS_DIR / f"{name}.json"
    result = json.loads(path.read_text()) if status == "ok" and path.exists() else None
    return {"status": status, "seconds": seconds, "command": " ".join(["python", *argv[1:]]),
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
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
        path = common.RESULTS_DIR / f"{name}.json"
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
