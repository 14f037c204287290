"""What every benchmark here shares: servers as child processes, wrk, medians, results.

Benchmarks run real processes on loopback: ``ballast serve`` (or the bare app) as a
child with its own SQLite file, driven by ``wrk`` or by a small client. A busy or
shared machine makes absolute numbers drift, so each benchmark measures its baseline
side by side in the same run and reports ratios and medians over rounds.

Only the standard library is imported at the top, so the baseline apps
(:mod:`bench.bare_app`, :mod:`bench.naive_app`) can use :func:`app_main` without
loading Ballast into their process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LUA_DIR = BENCH_DIR / "lua"
PYTHON = sys.executable
BALLAST = str(Path(PYTHON).with_name("ballast"))


def builtin_plugins() -> tuple[str, ...]:
    """Every builtin plugin, so "all off" stays all off as plugins are added ("all on" is
    the default config, whatever it enables)."""
    from ballast.plugin_manager import BUILTIN_PLUGINS

    return tuple(name for name, _ in BUILTIN_PLUGINS)


def default_on_plugins() -> tuple[str, ...]:
    """The builtin plugins the default config enables."""
    import tomllib

    plugins = tomllib.loads((ROOT / "config" / "default.toml").read_text()).get("plugins", {})
    return tuple(name for name in builtin_plugins() if plugins.get(name, {}).get("enabled", False))


# ---------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (atomically) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def rotated(names: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: the list turned by ``r``, so no server is always measured first."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


# ---------------------------------------------------------------------- the command line


def parser(doc: str | None, *, write: bool = True, rounds: int | None = None,
           duration: float | None = None, connections: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring's first paragraph, ``--no-write``, and
    ``--rounds`` / ``--duration`` / ``--connections`` with the defaults given (each only
    when given)."""
    p = argparse.ArgumentParser(description=" ".join((doc or "").split("\n\n")[0].split()) or None)
    if write:
        p.add_argument("--no-write", action="store_true", help="print only; keep results/ as is")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help="rounds (default %(default)s)")
    if duration is not None:
        p.add_argument("--duration", type=float, default=duration,
                       help="seconds per load run (default %(default)s)")
    if connections is not None:
        p.add_argument("--connections", type=int, default=connections,
                       help="wrk connections (default %(default)s)")
    return p


def finish(name: str, result: Mapping[str, Any], args: argparse.Namespace, shown: Any) -> int:
    """Write ``results/<name>.json`` (unless ``--no-write``), print ``shown``; exit status 0.

    ``shown`` is printed as it is when it is a string, as indented JSON otherwise.
    """
    if not getattr(args, "no_write", False):
        write_result(name, result)
    print(shown if isinstance(shown, str) else json.dumps(shown, indent=2))
    return 0


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def http_json(method: str, url: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")


def create_sessions(origin: str, prefix: str, count: int, **fields: Any) -> None:
    """Create sessions ``<prefix>0`` .. ``<prefix><count - 1>`` (with ``fields``); any
    answer but 201 stops the benchmark."""
    for i in range(count):
        status, body = http_json("POST", f"{origin}/v1/sessions", {"session_id": f"{prefix}{i}", **fields})
        if status != 201:
            raise RuntimeError(f"{origin}: could not create a session: {status} {body}")


class ServerProcess:
    """A server child process on 127.0.0.1, its stdout in a file; ready when /healthz answers."""

    def __init__(self, argv: Sequence[str], *, port: int, env: Mapping[str, str] | None = None,
                 stdout: Path | None = None, ready_path: str = "/healthz",
                 start_timeout: float = 30.0) -> None:
        self.argv = list(argv)
        self.port = port
        self.env = dict(os.environ if env is None else env)
        self.stdout_path = stdout
        self.ready_path = ready_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._out = open(self.stdout_path, "ab") if self.stdout_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._out,
                                     stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(self.origin + self.ready_path, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.argv} did not become ready on port {self.port}")

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._out not in (None, subprocess.DEVNULL):
            self._out.close()
        self._out = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ballast_env(db: Path, port: int, *, plugins_on: bool = True, durability: str = "full",
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``ballast serve`` on ``db`` and ``port`` (default config file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALLAST__")}
    env.update({
        "BALLAST__SERVER__HOST": "127.0.0.1",
        "BALLAST__SERVER__PORT": str(port),
        "BALLAST__STORAGE__PATH": str(db),
        "BALLAST__STORAGE__DURABILITY": durability,
    })
    if not plugins_on:
        for name in builtin_plugins():
            env[f"BALLAST__PLUGINS__{name.upper()}__ENABLED"] = "false"
    if extra:
        env.update(extra)
    return env


def ballast_server(db: Path, *, plugins_on: bool = True, durability: str = "full",
                   stdout: Path | None = None, extra_env: Mapping[str, str] | None = None) -> ServerProcess:
    port = free_port()
    env = ballast_env(db, port, plugins_on=plugins_on, durability=durability, extra=extra_env)
    return ServerProcess([BALLAST, "serve"], port=port, env=env, stdout=stdout)


class WorkDir:
    """A scratch directory on the same disk as the project's default database."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"ballast-{prefix}-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not os.environ.get("BALLAST_BENCH_KEEP"):
            shutil.rmtree(self.path, ignore_errors=True)


def write_bench_log(lines: int, path: str) -> None:
    """Write a synthetic server log of ``lines`` lines to ``path`` with ``bench_logs.py``."""
    subprocess.run([PYTHON, str(BENCH_DIR / "bench_logs.py"), "--lines", str(lines),
                    "--rounds", "1", "--keep", path], check=True, capture_output=True, timeout=1800)


# ---------------------------------------------------------------------- wrk


def wrk(url: str, *, threads: int = 1, connections: int = 16, duration_s: float = 5.0,
        script: Path | None = None, script_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run wrk (time-bounded) with a Lua script whose ``done()`` prints one JSON line.

    Returns that JSON: ``requests``, ``duration_s``, ``rps``, ``errors`` and latency
    percentiles in milliseconds.
    """
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    lua = script or LUA_DIR / "get.lua"
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
            "-s", str(lua), url]
    if script_args:
        argv += ["--", *script_args]
    run_env = dict(os.environ)
    run_env["LUA_PATH"] = f"{LUA_DIR}/?.lua;;"
    if env:
        run_env.update(env)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, env=run_env)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"rps"' in line:
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"wrk printed no result (exit {proc.returncode}): {proc.stdout}\n{proc.stderr}")


def wrk_cpu(server: ServerProcess, path: str = "", **kwargs: Any) -> dict[str, Any]:
    """:func:`wrk` against ``path`` on ``server``, adding the server's CPU time over the run.

    Adds ``cpu_s`` and ``cpu_us_per_request`` (all its threads, user + system): steadier
    than throughput on a busy machine, and what the request path costs.
    """
    before = cpu_seconds(server.pid)
    result = wrk(server.origin + path, **kwargs)
    spent = cpu_seconds(server.pid) - before
    result["cpu_s"] = round(spent, 4)
    result["cpu_us_per_request"] = round(spent * 1e6 / max(result["requests"], 1), 1)
    return result


def add_goodput(result: dict[str, Any], per_request: int) -> int:
    """Add ``mutations_per_s`` to a wrk result: mutations in 2xx answers only (wrk ignores
    ``Retry-After``, so a refused request is retried at once and would count many
    times). Returns the number of 2xx answers."""
    ok = int(result["requests"] - result["non_2xx"])
    result["mutations_per_s"] = round(ok * per_request / result["duration_s"], 1)
    return ok


def print_round(r: int, rounds: int, row: Mapping[str, Any], names: Sequence[str]) -> None:
    """One progress line on stderr: each server's req/s and CPU per request this round."""
    print(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {row[n]['rps']:.0f} rps {row[n]['cpu_us_per_request']:.0f} us cpu/req" for n in names),
        file=sys.stderr)


# ---------------------------------------------------------------------- baseline apps


def app_main(doc: str | None, build: Callable[[argparse.Namespace], web.Application],
             configure: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Run a baseline app (``--db``, ``--port``) on 127.0.0.1, with ``/healthz`` for
    :class:`ServerProcess`, no access log and nothing printed."""
    from aiohttp import web

    p = parser(doc, write=False)
    p.add_argument("--db", required=True)
    p.add_argument("--port", type=int, required=True)
    if configure is not None:
        configure(p)
    args = p.parse_args()
    app = build(args)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
