"""``ballast serve --workers N``: N server processes on one port, kept alive by a supervisor.

One server process is one event loop on one core. To use more cores, the supervisor
starts N ordinary ``ballast serve`` processes that each bind the same host and port with
``SO_REUSEPORT``; the kernel spreads new connections over their listening sockets, so
there is no accept lock and no hand-off through the supervisor. The supervisor serves no
requests: it starts the workers, restarts one that dies (logged, with a growing pause
if it keeps dying at once), and on ``SIGTERM``/``SIGINT`` forwards ``SIGTERM`` to every
worker, which drains as a single server does, and exits 0 once all have stopped cleanly.

The supervisor holds a bound (not listening) ``SO_REUSEPORT`` socket on the port for its
whole life: port 0 is resolved once so every worker gets the same port, a port already
taken by something else fails at once, and the port stays reserved while a worker is
being restarted. A bound socket that does not listen is never handed a connection.

What the workers share is the database: SQLite's file (each worker has its own writer
and group commit; the file lock orders their transactions and ``seq`` is assigned inside
each write transaction) or PostgreSQL.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

from ballast import logging as blog

#: A worker that dies sooner than this after its start counts as crashing at start-up:
#: each such restart waits twice as long as the previous one, up to the cap.
STABLE_AFTER_S: Final = 5.0
RESTART_PAUSE_S: Final = 0.2
MAX_RESTART_PAUSE_S: Final = 10.0
#: Extra time, beyond the workers' own shutdown timeout, before a worker that ignores
#: SIGTERM is killed.
KILL_GRACE_S: Final = 5.0
POLL_S: Final = 0.05

_PR_SET_PDEATHSIG: Final = 1

#: The directory prometheus-client's multiprocess mode shares between the workers.
METRICS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

log = blog.get_logger("ballast.workers")


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket; its port is the workers' port."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies (Linux), never orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause_s: float = RESTART_PAUSE_S
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts ``workers`` copies of ``command`` (each told its index) and keeps them running."""

    command: list[str]
    workers: int
    shutdown_timeout_s: float
    host: str
    port: int
    _pool: list[_Worker] = field(default_factory=list)
    _stop_signal: str | None = None

    env: dict[str, str] | None = None

    def _spawn(self, worker: _Worker) -> None:
        cmd = [*self.command, "--worker-index", str(worker.index)]
        worker.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=self.env)
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("server.worker_started", worker=worker.index, pid=worker.proc.pid,
                 restarts=worker.restarts)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_signal is None:
            self._stop_signal = signal.Signals(signum).name

    def run(self) -> int:
        """Supervise until a stop signal; 0 if every worker then stopped cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("server.supervisor_started", host=self.host, port=self.port, workers=self.workers,
                 pid=os.getpid())
        self._pool = [_Worker(i) for i in range(self.workers)]
        for worker in self._pool:
            self._spawn(worker)
        while self._stop_signal is None:
            self._check()
            time.sleep(POLL_S)
        return self._stop_all()

    def _check(self) -> None:
        now = time.monotonic()
        for worker in self._pool:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                quick = now - worker.started < STABLE_AFTER_S
                worker.pause_s = min(worker.pause_s * 2, MAX_RESTART_PAUSE_S) if quick else RESTART_PAUSE_S
                worker.restart_at = now + worker.pause_s
                worker.proc = None
                _forget_metrics_of(proc.pid)
                log.error("server.worker_exited", worker=worker.index, pid=proc.pid,
                          exit_code=code if code >= 0 else None,
                          signal=signal.Signals(-code).name if code < 0 else None,
                          restart_in_s=round(worker.pause_s, 3))
            if worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                worker.restarts += 1
                self._spawn(worker)

    def _stop_all(self) -> int:
        log.info("server.stopping", signal=self._stop_signal, workers=self.workers)
        running = [w.proc for w in self._pool if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.shutdown_timeout_s + KILL_GRACE_S
        clean = True
        for proc in running:
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                log.error("server.worker_killed", pid=proc.pid)
            clean = clean and code == 0
        log.info("server.stopped", clean=clean)
        return 0 if clean else 1


def _forget_metrics_of(pid: int) -> None:
    """Drop a dead worker's live gauges from the shared metrics directory, if one is used."""
    if not os.environ.get(METRICS_DIR_ENV):
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def clear_metrics_dir(path: str) -> None:
    """Create ``path`` if needed and remove the value files a previous run left there."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def supervise(config_path: str | None, host: str, port: int, workers: int,
              shutdown_timeout_s: float) -> int:
    """Run ``workers`` server processes on ``host:port`` until SIGTERM/SIGINT."""
    reservation = reserve_port(host, port)
    # Workers write their metrics to one directory (prometheus-client's multiprocess
    # mode), so that a scrape of any of them can sum all; made fresh for each run, or,
    # if the operator named one, emptied of an earlier run's values.
    made_dir = None
    if not os.environ.get(METRICS_DIR_ENV):
        made_dir = tempfile.mkdtemp(prefix="ballast-metrics-")
        os.environ[METRICS_DIR_ENV] = made_dir
    else:
        clear_metrics_dir(os.environ[METRICS_DIR_ENV])
    try:
        bound_port = int(reservation.getsockname()[1])
        command = [sys.executable, "-m", "ballast.cli", "serve", "--host", host,
                   "--port", str(bound_port), "--workers", "1"]
        if config_path is not None:
            command += ["--config", config_path]
        supervisor = Supervisor(command, workers, shutdown_timeout_s, host, bound_port)
        return supervisor.run()
    finally:
        reservation.close()
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)


async def gunicorn_app() -> object:
    """The application for gunicorn's aiohttp worker, configured like ``ballast serve``.

    ``gunicorn 'ballast.workers:gunicorn_app' --worker-class aiohttp.GunicornWebWorker
    --workers 2 --bind 127.0.0.1:8080``; the config file is ``BALLAST_CONFIG`` (default:
    ``config/default.toml``), overridden by ``BALLAST__...`` variables as usual.
    """
    from ballast.app import build_app
    from ballast.config import load_settings
    from ballast.plugin_manager import load_plugins

    config = load_settings(os.environ.get("BALLAST_CONFIG") or None)
    blog.configure(config.settings.logging.format, config.settings.logging.level)
    return build_app(config, load_plugins(config))
