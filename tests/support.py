"""Test support: run a real ``ballast serve`` process on loopback and read its logs.

Tests import this as ``from support import ServerProcess`` (``tests`` is on the path).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BALLAST = str(Path(sys.executable).parent / "ballast")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ballast_cmd(*args: str) -> list[str]:
    """The installed console script if present, else the module."""
    if os.path.exists(BALLAST):
        return [BALLAST, *args]
    return [sys.executable, "-m", "ballast.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(ballast_cmd(*args), capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO, input=stdin)


class ServerProcess:
    """A ``ballast serve`` subprocess with its own config, SQLite file and log file."""

    def __init__(self, workdir: Path, config: str = "", env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db = workdir / "ballast.db"
        self.config_path = workdir / "ballast.toml"
        self.config_path.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[storage]\npath = "{self.db}"\n' + config)
        self.env = {**os.environ, **(env or {})}
        self.log_path = workdir / "server.log"
        self.err_path = workdir / "server.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        out = self.log_path.open("ab")
        err = self.err_path.open("ab")
        self.proc = subprocess.Popen(ballast_cmd("serve", "--config", str(self.config_path)),
                                     stdout=out, stderr=err, env=self.env, cwd=self.workdir)
        out.close()
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.err_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not become ready: {self.err_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                lines.append(obj)
        return lines

    def raw_logs(self) -> str:
        return self.log_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """A blocking HTTP call for black-box tests; returns (status, headers, parsed body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            status, rh = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        status, rh = exc.code, dict(exc.headers)
    try:
        parsed: Any = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload.decode(errors="replace")
    return status, rh, parsed


def run_logs_cli(*argv: str) -> tuple[int, str, str]:
    """``ballast logs ARGV`` in this process: (exit status, stdout, stderr)."""
    import io

    from ballast.logs.cli import main as logs_main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = logs_main(list(argv))
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


#: Python source that prints this process's peak RSS in KiB: ``VmHWM`` where /proc has
#: it. Not ``ru_maxrss``: across ``exec`` Linux keeps the larger of the old and new
#: peaks, so a child started from a big test process reports the parent's size.
PEAK_RSS_KIB = """
def _peak_rss_kib():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
