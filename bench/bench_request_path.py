"""What each stack costs on the request path itself, per request.

The wrk benchmarks (``bench_overhead.py``) measure whole servers, sockets and HTTP
parsing included, and on a shared 2-core machine their ratios move by several percent
between runs. This one isolates the part the plugins change: one process builds the
application for each stack (the default config, every builtin plugin off, and with
``--each-off`` the default with each default-on plugin off alone), starts it, and feeds
each the same point read, ``GET /v1/sessions/{id}``, as raw HTTP/1.1 over in-memory
keep-alive connections (``--connections`` requests in flight at once): parsing,
routing, every middleware, the handler, the store read on its reader thread, the
response and the canonical log line (to a file); no socket.

Two measures:

* CPU time of the whole process (reader thread included) per request, the minimum over
  many short batches, the stacks interleaved batch by batch: a neighbour's load makes a
  batch slower, never faster, so the minimum is the steadier estimate;
* with ``--instructions``, machine instructions per request under
  ``valgrind --tool=callgrind``, which counts the same on a busy machine as on an idle
  one: each stack runs alone in a child under valgrind, once with one batch and once
  with five, and the difference is divided by the requests of the four extra batches
  (start-up cancels out). Slow (about three minutes for two stacks, run two at a time)
  and blind to system calls; under valgrind's slowdown the admission limit is pinned
  and the request budget raised so that nothing is refused.

    python bench/bench_request_path.py [--batches 30] [--requests 1280] [--each-off]
    python bench/bench_request_path.py --instructions [--only all_on,all_off]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from bench import common

SESSION = "bench-path"


@contextlib.contextmanager
def _quiet_stdout(path: Path) -> Iterator[None]:
    """The canonical lines go to a file, as in production, not to the terminal."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(fd, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)


def _env(db: Path, off: tuple[str, ...]) -> dict[str, str]:
    env = dict(os.environ)  # BALLAST__* settings of the caller apply to every stack alike
    env["BALLAST__STORAGE__PATH"] = str(db)
    for name in off:
        env[f"BALLAST__PLUGINS__{name.upper()}__ENABLED"] = "false"
    return env


class _Transport(asyncio.Transport):
    """A connection's far end in memory: collects what the server writes."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.done: asyncio.Event = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) >= head_end + 4 + length:
            self.done.set()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Connection:
    """One keep-alive connection to the server's protocol, fed raw HTTP/1.1."""

    def __init__(self, runner: web.AppRunner) -> None:
        server = runner.server
        assert server is not None
        self.protocol = server()
        self.transport = _Transport()
        self.protocol.connection_made(self.transport)

    async def request(self, raw: bytes) -> bytes:
        t = self.transport
        t.buffer.clear()
        t.done.clear()
        self.protocol.data_received(raw)
        await t.done.wait()
        return bytes(t.buffer)


async def _pump(conn: _Connection, raw: bytes, n: int) -> None:
    for _ in range(n):
        out = await conn.request(raw)
        if not out.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET answered {out[:40]!r}")


async def _batch(conns: list[_Connection], raw: bytes, n: int) -> float:
    """``n`` requests over the connections at once, as a loaded server sees them."""
    each = max(1, n // len(conns))
    start = time.process_time()
    await asyncio.gather(*(_pump(c, raw, each) for c in conns))
    return (time.process_time() - start) / (each * len(conns))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from ballast.app import build_app
    from ballast.config import load_settings

    builtin = common.builtin_plugins()
    default_on = common.default_on_plugins()
    stacks: dict[str, tuple[str, ...]] = {"all_on": (), "all_off": builtin}
    if args.each_off or args.only:
        for name in default_on:
            stacks[f"without_{name}"] = (name,)
    if args.only:
        stacks = {name: stacks[name] for name in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="ballast-path-"))
    runners: dict[str, web.AppRunner] = {}
    db = work / "bench.db"
    path = f"/v1/sessions/{SESSION}"
    per: dict[str, list[float]] = {name: [] for name in stacks}
    with _quiet_stdout(work / "stdout.log"):
        from ballast import logging as blog

        first = load_settings(environ=_env(db, ()))
        blog.configure(first.settings.logging.format, first.settings.logging.level)
        for name, off in stacks.items():
            config = load_settings(environ=_env(db, off))
            app = build_app(config)
            runner = web.AppRunner(app)
            await runner.setup()
            runners[name] = runner
        await _create(next(iter(runners.values())))
        conns = {name: [_Connection(runner) for _ in range(args.connections)]
                 for name, runner in runners.items()}
        raw = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        try:
            for name in stacks:  # warm up: route caches, first reads
                await _batch(conns[name], raw, args.requests)
            for b in range(args.batches):
                order = common.rotated(list(stacks), b)
                for name in order:
                    per[name].append(await _batch(conns[name], raw, args.requests))
        finally:
            for runner in runners.values():
                await runner.cleanup()
    best = {name: min(v) * 1e6 for name, v in per.items()}
    base = best.get("all_on", 0.0)
    return {
        "machine": common.machine(),
        "batches": args.batches, "requests_per_batch": args.requests,
        "cpu_us_per_request_min": {k: round(v, 2) for k, v in best.items()},
        "cpu_us_per_request_median": {k: round(common.median(v) * 1e6, 2) for k, v in per.items()},
        "plugin_cost_us": {k.removeprefix("without_"): round(base - v, 2)
                           for k, v in best.items() if k.startswith("without_")},
        "all_on_minus_all_off_us": round(base - best.get("all_off", base), 2),
    }


async def _create(runner: web.AppRunner) -> None:
    body = json.dumps({"session_id": SESSION, "title": "Weekly sync",
                       "participants": [{"name": "Alice"}, {"name": "Bob"}, {"name": "Chen"}]}).encode()
    raw = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    out = await _Connection(runner).request(raw)
    if not out.startswith((b"HTTP/1.1 201", b"HTTP/1.1 409")):
        raise RuntimeError(f"create answered {out[:40]!r}")


#: Under valgrind a request takes ~50x longer: keep the admission limit above the
#: connections and the budget far away, so the instructions counted are a served read's.
VALGRIND_ENV = {
    "BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__MIN_LIMIT": "64",
    "BALLAST__PLUGINS__ADAPTIVE_CONCURRENCY__INITIAL_LIMIT": "64",
    "BALLAST__PLUGINS__TIMEOUT_BUDGET__REQUEST_MS": "3600000",
}


def _callgrind(stack: str, batches: int, requests: int, work: Path) -> int:
    import re
    import subprocess

    out = work / f"{stack}.{batches}.callgrind"
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
         "--only", stack, "--batches", str(batches), "--requests", str(requests)],
        env={**os.environ, **VALGRIND_ENV}, capture_output=True, text=True, timeout=3600)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{stack} under valgrind failed: {result.stderr[-500:]}")
    return int(found.group(1))


def instructions(stacks: list[str], requests: int) -> dict[str, Any]:
    """Instructions per request of each stack (see the module's docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    work = Path(tempfile.mkdtemp(prefix="ballast-callgrind-"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = {(s, b): pool.submit(_callgrind, s, b, requests, work) for s in stacks for b in (1, 5)}
        per = {s: (counts[(s, 5)].result() - counts[(s, 1)].result()) / (4 * requests) for s in stacks}
    out: dict[str, Any] = {"machine": common.machine(), "requests_per_batch": requests,
                           "instructions_per_request": {s: round(v) for s, v in per.items()}}
    if "all_on" in per and "all_off" in per:
        out["all_off_over_all_on"] = round(per["all_off"] / per["all_on"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--requests", type=int, default=1280)
    p.add_argument("--connections", type=int, default=32, help="requests in flight at once")
    p.add_argument("--each-off", action="store_true")
    p.add_argument("--only", help="only these stacks, comma-separated (all_on, all_off, "
                                  "without_<plugin>); one alone for a profiler")
    p.add_argument("--stdlib-loop", action="store_true", help="asyncio's own loop, not uvloop")
    p.add_argument("--instructions", action="store_true",
                   help="instructions per request under valgrind (default stacks: all_on,all_off)")
    args = p.parse_args()
    if args.instructions:
        stacks = (args.only or "all_on,all_off").split(",")
        print(json.dumps(instructions(stacks, min(args.requests, 640)), indent=2))
        return 0
    from ballast.cli import _loop_factory

    with asyncio.Runner(loop_factory=_loop_factory(not args.stdlib_loop)) as runner:
        out = runner.run(main_async(args))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
