"""Throughput and memory of ``ballast logs summarize`` on a large, realistic log.

The summary must keep up with production logs (>= 100,000 lines/s) in memory that does
not grow with the file. This script writes a synthetic log with the server's event mix
(canonical request lines, retries, give-ups, unhandled errors with tracebacks, mutation
failures, finalize stages and outcomes, bulkhead rejections, a few malformed lines) to a
temporary file, summarises it in this process, and prints one JSON line:
``{"lines", "written", "bytes", "gzip", "rounds", "seconds", "lines_per_s",
"lines_per_s_best", "cpu_seconds", "lines_per_cpu_s", "mb_per_s", "rss_before_mb",
"peak_rss_mb", "rss_growth_mb", "requests", "skipped"}``; times are medians over
``--rounds`` summaries of the same file, since a busy machine makes single runs drift.
Peak RSS is this process's high-water mark (``getrusage``); the log is written by a
forked child, so the mark is the summary's own. Run with ``--lines 100000`` and
``--lines 1000000`` to see that it does not grow with the file.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson

ROUTES = [
    ("POST", "/v1/sessions/{session_id}/mutations", 40, 6.0),
    ("GET", "/v1/sessions/{session_id}", 20, 1.5),
    ("GET", "/v1/sessions/{session_id}/mutations", 10, 3.0),
    ("POST", "/v1/sessions", 5, 4.0),
    ("POST", "/v1/sessions/{session_id}/resolve", 4, 350.0),
    ("POST", "/v1/sessions/{session_id}/finalize", 3, 8.0),
    ("GET", "/v1/sessions/{session_id}/finalize", 8, 1.2),
    ("GET", "/v1/sessions/{session_id}/report", 3, 2.0),
    ("GET", "/healthz", 5, 0.3),
    ("GET", "/readyz", 2, 0.3),
]
STAGES = ["freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist"]
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/ballast/framework/sessions/service.py", line 212, in resolve\n'
    "    mapping = await self._inference.resolve(session)\n"
    '  File "/srv/ballast/framework/upstream.py", line 148, in call\n'
    "    raise UpstreamError(kind, status=status)\n"
    "ballast.errors.UpstreamError: upstream failed after 3 attempts\n"
)


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class LogWriter:
    """Writes synthetic lines in batches, so generating a big log stays small in memory."""

    def __init__(self, out: Sink, start: datetime) -> None:
        self.out = out
        self.now = start
        self.batch: list[bytes] = []
        self.written = 0

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.now += timedelta(microseconds=random.randint(50, 3000))
        record = {
            "timestamp": self.now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": level,
            "event": event,
            **fields,
        }
        self.raw(orjson.dumps(record))

    def raw(self, line: bytes) -> None:
        self.batch.append(line)
        self.written += 1
        if len(self.batch) >= 5000:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.out.write(b"\n".join(self.batch) + b"\n")
            self.batch.clear()


def generate(out: Sink, lines: int, seed: int = 7) -> int:
    """Write about ``lines`` lines (a request's lines are never split); the count written."""
    random.seed(seed)
    writer = LogWriter(out, datetime(2026, 11, 28, 8, 0, tzinfo=UTC))
    writer.emit("server.started", host="0.0.0.0", port=8080)
    weights = [w for _, _, w, _ in ROUTES]
    sessions = [f"sess-{i:05d}" for i in range(2000)]
    while writer.written < lines:
        roll = random.random()
        if roll < 0.0005:
            writer.raw(b'{"timestamp": "2026-11-28T08:00:00Z", "level": "info", "event": ')
            continue
        if roll < 0.001:
            writer.raw(b"[1, 2, 3]")
            continue
        session_id = random.choice(sessions)
        request_id = f"{random.getrandbits(128):032x}"
        method, route, _, median = random.choices(ROUTES, weights)[0]
        ctx = {"request_id": request_id}
        if "{session_id}" in route:
            ctx["session_id"] = session_id
        status = 200
        if route.endswith("/resolve"):
            for attempt in (1, 2):
                if random.random() < 0.15:
                    failed_status = random.choice([429, 502, 503, None])
                    writer.emit(
                        "upstream.retry",
                        "warning",
                        **ctx,
                        name="inference.resolve",
                        attempt=attempt,
                        status=failed_status,
                        error_type=None if failed_status else "TimeoutError",
                        delay_ms=500.0 * attempt,
                        remaining_ms=8000.0,
                    )
            if random.random() < 0.02:
                writer.emit(
                    "upstream.failed",
                    "error",
                    **ctx,
                    name="inference.resolve",
                    attempts=3,
                    kind=random.choice(["status", "timeout", "connection"]),
                    status=503,
                    error_type="UpstreamError",
                )
                writer.emit(
                    "error.unhandled",
                    "error",
                    **ctx,
                    error_type="UpstreamError",
                    error="upstream failed after 3 attempts",
                    traceback=TRACEBACK,
                    status=502,
                )
                status = 502
        elif route.endswith("/mutations") and method == "POST" and random.random() < 0.01:
            writer.emit(
                "session.mutation_failed",
                "error",
                session_id=session_id,
                mutation_id=f"m-{random.getrandbits(32):08x}",
                mutation_type="utterance",
                error_type="IntegrityError",
                error="UNIQUE constraint failed",
            )
        elif route.endswith("/finalize") and method == "POST":
            for attempt_stage in STAGES:
                writer.emit(
                    "finalize.stage",
                    session_id=session_id,
                    attempt=1,
                    stage=attempt_stage,
                    state="succeeded",
                    duration_ms=round(random.lognormvariate(1.0, 1.0), 3),
                )
            outcome = random.choices(["succeeded", "failed", "timed_out"], [90, 4, 6])[0]
            if outcome == "timed_out":
                writer.emit(
                    "finalize.timed_out",
                    "warning",
                    session_id=session_id,
                    attempt=1,
                    stage=random.choice(["report", "replay"]),
                    budget_ms=30000,
                    elapsed_ms=30001.5,
                )
            elif outcome == "failed":
                writer.emit(
                    "finalize.failed",
                    "error",
                    session_id=session_id,
                    attempt=1,
                    stage="report",
                    error_type="InferenceError",
                )
            writer.emit(
                "finalize.completed",
                session_id=session_id,
                attempt=1,
                state=outcome,
                elapsed_ms=1234.5,
            )
            status = 202
        if random.random() < 0.003:
            writer.emit("bulkhead.rejected", "warning", **ctx, in_flight=8, max_workers=8, max_queue=64)
            status = 503
        elif status == 200 and random.random() < 0.03:
            status = random.choice([400, 404, 409, 422])
        writer.emit(
            "http.request",
            **ctx,
            method=method,
            route=route,
            path=route.replace("{session_id}", session_id),
            status=status,
            duration_ms=round(random.lognormvariate(0, 0.8) * median, 3),
        )
    writer.flush()
    return writer.written


def _write_log(path: str, lines: int, compress: bool) -> int:
    with open(path, "wb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
                return generate(gz, lines)
        return generate(raw, lines)


def _generate_elsewhere(path: str, lines: int, compress: bool) -> int:
    """Write the log in a forked child, so this process's peak RSS is the summary's own."""
    if not hasattr(os, "fork"):
        return _write_log(path, lines, compress)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, report the count, leave without cleanup
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, str(_write_log(path, lines, compress)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not reported:
        raise RuntimeError("generating the benchmark log failed")
    return int(reported)


def _rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return usage / (1024 * 1024) if sys.platform == "darwin" else usage / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines to generate (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=3, help="summaries of the same file (default 3)")
    parser.add_argument("--gzip", action="store_true", help="write the log gzip-compressed")
    parser.add_argument("--keep", metavar="PATH", help="write the log here and keep it")
    parser.add_argument("--engine", choices=("auto", "native", "duckdb", "stream"), default="stream",
                        help="summary engine (default stream: the one-pass figures below are its own; "
                             "bench_logs_compare.py times the engines side by side)")
    parser.add_argument("--workers", type=int, default=1,
                        help="summary processes (default 1: the one-pass engine, whose memory this "
                             "process's peak RSS measures; bench_logs_compare.py times the default)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ballast.logs import summarize_file

    if args.keep:
        path = args.keep
    else:
        fd, path = tempfile.mkstemp(prefix="ballast-bench-", suffix=".log.gz" if args.gzip else ".log")
        os.close(fd)
    try:
        written = _generate_elsewhere(path, args.lines, args.gzip)
        size = os.path.getsize(path)
        rss_before = _rss_mb()
        walls: list[float] = []
        cpus: list[float] = []
        for _ in range(max(1, args.rounds)):
            started = time.perf_counter()
            cpu_started = time.process_time()
            report = summarize_file(path, workers=args.workers, engine=args.engine)
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu_started)
        peak = _rss_mb()
        lines = report["lines"]["total"]
        seconds = statistics.median(walls)
        cpu_seconds = statistics.median(cpus)
        result = {
            "lines": lines,
            "written": written,
            "bytes": size,
            "gzip": args.gzip,
            "engine": args.engine,
            "workers": args.workers,
            "rounds": len(walls),
            "seconds": round(seconds, 3),
            "lines_per_s": round(lines / seconds),
            "lines_per_s_best": round(lines / min(walls)),
            "cpu_seconds": round(cpu_seconds, 3),
            "lines_per_cpu_s": round(lines / cpu_seconds),
            "mb_per_s": round(size / seconds / 1e6, 1),
            "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(peak, 1),
            "rss_growth_mb": round(peak - rss_before, 1),
            "requests": report["requests"]["total"],
            "skipped": report["lines"]["skipped"],
        }
        print(orjson.dumps(result).decode())
    finally:
        if not args.keep:
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
