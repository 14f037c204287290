"""`ballast serve` as a real process: graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstreamProcess
from support import ServerProcess, request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_exits_zero_on_signal(tmp_path: Path, sig: int) -> None:
    server = ServerProcess(tmp_path).start()
    status, _, body = request("GET", server.base_url + "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    started = time.monotonic()
    assert server.stop(sig) == 0
    assert time.monotonic() - started < 5
    events = [line["event"] for line in server.logs()]
    assert "server.started" in events and events[-1] == "server.stopped"


def test_request_in_flight_at_sigterm_completes(tmp_path: Path) -> None:
    """A resolve waiting 1.5 s on the upstream is answered although SIGTERM came first."""
    with FakeUpstreamProcess(script=["hang:1.5"]) as fake:
        config = (f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\n'
                  'model = "m"\n')
        server = ServerProcess(tmp_path, config=config).start()
        base = server.base_url
        status, _, body = request("POST", base + "/v1/sessions",
                                  {"session_id": "s1", "participants": [{"name": "Alice"}]})
        assert status == 201, body
        request("POST", base + "/v1/sessions/s1/mutations", {"mutations": [
            {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 500,
             "text": "Hello, I'm Alice."}]})
        result: dict[str, Any] = {}

        def call() -> None:
            result["resp"] = request("POST", base + "/v1/sessions/s1/resolve")

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 5
        while fake.attempts < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.attempts == 1
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        thread.join(10)
        assert server.stop() == 0
        status, _, body = result["resp"]
        assert status == 200, body
        assert body == {"speakers": {"spk_0": "Alice"}}
        # New connections are refused once it has stopped.
        with pytest.raises(OSError):
            import socket

            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_ballast_logs_starts_without_the_server(tmp_path: Path) -> None:
    """``ballast logs`` goes straight to the log tools: the server's modules are not imported."""
    log = tmp_path / "a.log"
    log.write_bytes(b'{"event":"http.request","level":"info","status":200,"route":"/a"}\n')
    script = (
        "import sys\n"
        "from ballast.command import main\n"
        f"code = main(['logs', 'summarize', '--json', {str(log)!r}])\n"
        "server = ('aiohttp', 'pydantic', 'ballast.config', 'ballast.cli')\n"
        "heavy = sorted(m for m in server if m in sys.modules)\n"
        "print(code, heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "0 []", proc.stderr
    assert json.loads(proc.stdout)["requests"]["total"] == 1
    # Every other command is the full CLI's.
    full = "from ballast.command import main; main(['config', 'check'])"
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: ballast config check" in proc.stderr
