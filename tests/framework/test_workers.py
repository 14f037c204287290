"""``ballast serve --workers N``: real worker processes on one port, sharing one SQLite file."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import ServerProcess, free_port, request

from ballast.workers import reserve_port


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in server.logs() if line.get("event") == name]


def started_workers(server: ServerProcess) -> set[int]:
    return {line["worker"] for line in events(server, "server.started") if "worker" in line}


def test_two_workers_share_the_port_and_one_sqlite_file(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"BALLAST__SERVER__WORKERS": "2"})
    server.start()
    try:
        wait_for(lambda: started_workers(server) == {0, 1})
        status, _, _ = request("POST", server.base_url + "/v1/sessions", {"session_id": "w"})
        assert status == 201

        def post(i: int) -> int:
            status, _, body = request("POST", server.base_url + "/v1/sessions/w/mutations",
                                      {"mutations": [{"id": f"m{i}", "type": "note", "text": f"n{i}"}]})
            assert status == 200, body
            seq: int = body["accepted"][0]["seq"]
            return seq

        with ThreadPoolExecutor(8) as pool:
            seqs = list(pool.map(post, range(100)))
        assert sorted(seqs) == list(range(1, 101))

        _, _, page = request("GET", server.base_url + "/v1/sessions/w/mutations?limit=500")
        assert [m["seq"] for m in page["mutations"]] == list(range(1, 101))
        assert sorted(m["id"] for m in page["mutations"]) == sorted(f"m{i}" for i in range(100))

        served = {line.get("worker") for line in events(server, "http.request")
                  if line.get("route") == "/v1/sessions/{session_id}/mutations"}
        assert served == {0, 1}, "both worker processes answer requests"
    finally:
        assert server.proc is not None
        t0 = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=10)
        elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 10
    stopped = events(server, "server.stopped")
    assert {line.get("worker") for line in stopped} == {0, 1, None}  # both workers + supervisor
    assert "Traceback" not in server.raw_logs()


def test_a_worker_that_dies_is_restarted_and_logged(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"BALLAST__SERVER__WORKERS": "2"})
    server.start()
    try:
        wait_for(lambda: started_workers(server) == {0, 1})
        victim = next(line["pid"] for line in events(server, "server.worker_started")
                      if line["worker"] == 1)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(line.get("pid") == victim for line in events(server, "server.worker_exited")))
        exited = next(line for line in events(server, "server.worker_exited") if line["pid"] == victim)
        assert exited["worker"] == 1 and exited["signal"] == "SIGKILL"
        wait_for(lambda: len([line for line in events(server, "server.started")
                              if line.get("worker") == 1]) == 2)
        restarted = [line for line in events(server, "server.worker_started") if line["worker"] == 1]
        assert restarted[-1]["restarts"] == 1 and restarted[-1]["pid"] != victim
        for _ in range(20):
            status, _, _ = request("GET", server.base_url + "/healthz")
            assert status == 200
    finally:
        code = server.stop(signal.SIGTERM, timeout=15)
    assert code == 0


def test_supervisor_refuses_a_port_taken_by_another_program(tmp_path: Path) -> None:
    import socket

    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        server = ServerProcess(tmp_path, env={"BALLAST__SERVER__WORKERS": "2"}, port=port)
        with pytest.raises(RuntimeError, match="exited with 1"):
            server.start(timeout=10)
        assert "cannot listen on 127.0.0.1" in server.err_path.read_text()
    finally:
        holder.close()


def test_reserve_port_resolves_port_zero_for_every_worker() -> None:
    sock = reserve_port("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        # A second SO_REUSEPORT socket (a worker) binds the same port while it is held.
        again = reserve_port("127.0.0.1", port)
        again.close()
    finally:
        sock.close()


async def test_gunicorn_app_builds_the_configured_application(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    from ballast.keys import CONFIG
    from ballast.workers import gunicorn_app

    config = tmp_path / "g.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "g.db"}"\n[server]\nport = 9999\n')
    monkeypatch.setenv("BALLAST_CONFIG", str(config))
    app = await gunicorn_app()
    assert isinstance(app, web.Application)
    assert app[CONFIG].settings.server.port == 9999
    assert app[CONFIG].settings.storage.path == str(tmp_path / "g.db")
