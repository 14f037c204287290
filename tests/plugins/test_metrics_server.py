"""metrics, black box: real ``ballast serve`` processes, the fake upstream over HTTP, and
real Prometheus text parsed by prometheus_client.parser.

Counters must agree exactly with what happened: a resolve that meets 503, 503, 200 adds
3 attempts and 2 retries; with several processes writing one multiprocess directory, one
scrape shows the sum of all of them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fake_upstream import FakeUpstreamProcess
from metrics_support import Scrape, scrape
from support import ServerProcess, request

from ballast.sessions.finalize import STAGES

RESOLVE_ROUTE = "/v1/sessions/{session_id}/resolve"


def _openai(base_url: str) -> str:
    return ("[inference]\n"
            'provider = "openai"\n'
            f'base_url = "{base_url}"\n'
            'model = "metrics-model"\n'
            "timeout_ms = 2000\n"
            "[plugins.retry]\n"
            "start_timeout_s = 0.01\n"
            "max_timeout_s = 0.05\n")


def _session(base: str, sid: str) -> None:
    status, _, body = request("POST", base + "/v1/sessions", {
        "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]})
    assert status == 201, body
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/mutations", {"mutations": [
        {"id": "u1", "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900,
         "text": "Hi, I'm Alice."},
        {"id": "u2", "type": "utterance", "speaker": "spk_1", "start_ms": 1000, "end_ms": 1900,
         "text": "Hello Alice, Bob here."}]})
    assert status == 200, body


def _job_end(base: str, sid: str, within: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status, _, body = request("GET", f"{base}/v1/sessions/{sid}/finalize")
        assert status == 200, body
        if body["job"]["state"] != "running" or time.monotonic() > deadline:
            job: dict[str, Any] = body["job"]
            return job
        time.sleep(0.05)


def _delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def test_resolve_with_two_retries_and_a_finalize_are_counted_exactly(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake, \
            ServerProcess(tmp_path / "server", config=_openai(fake.base_url)) as server:
        base = server.base_url
        _session(base, "demo")
        fake.reset()
        fake.script("503", "503", "ok")
        before = scrape(base)
        status, _, body = request("POST", base + "/v1/sessions/demo/resolve")
        assert status == 200, body
        after = scrape(base)
        assert fake.attempts == 3
        assert _delta(before, after, "ballast_upstream_attempts_total") == 3
        assert _delta(before, after, "ballast_upstream_attempts_total", outcome="status") == 2
        assert _delta(before, after, "ballast_upstream_attempts_total", outcome="ok") == 1
        assert _delta(before, after, "ballast_upstream_retries_total") == 2
        assert _delta(before, after, "ballast_upstream_retries_total", reason="status") == 2
        assert _delta(before, after, "ballast_upstream_calls_total", outcome="ok") == 1
        assert _delta(before, after, "ballast_upstream_calls_total") == 1
        assert _delta(before, after, "ballast_http_requests_total",
                      method="POST", route=RESOLVE_ROUTE, status="200") == 1
        assert _delta(before, after, "ballast_http_requests_total", route=RESOLVE_ROUTE) == 1
        assert _delta(before, after, "ballast_http_request_duration_seconds_count",
                      route=RESOLVE_ROUTE) == 1

        status, _, body = request("POST", base + "/v1/sessions/demo/finalize")
        assert status == 202, body
        assert _job_end(base, "demo")["state"] == "succeeded"
        done = scrape(base)
        assert _delta(after, done, "ballast_finalize_jobs_total", outcome="succeeded") == 1
        assert _delta(after, done, "ballast_finalize_jobs_total") == 1
        for stage in STAGES:
            assert _delta(after, done, "ballast_finalize_stage_duration_seconds_count", stage=stage) == 1
        assert done.label_values("ballast_finalize_stage_duration_seconds_count", "stage") == set(STAGES)
        # The report stage asked the upstream once, and it answered at once.
        assert _delta(after, done, "ballast_upstream_attempts_total", outcome="ok") == 1
        assert _delta(after, done, "ballast_upstream_retries_total") == 0
        # No host, port or session id ever becomes a label value.
        assert str(fake.port) not in done.text and "demo" not in done.text


def test_a_resolve_that_gives_up_counts_every_attempt_and_the_failed_call(tmp_path: Path) -> None:
    with FakeUpstreamProcess(default="503") as fake, \
            ServerProcess(tmp_path / "server", config=_openai(fake.base_url)) as server:
        base = server.base_url
        _session(base, "down")
        before = scrape(base)
        status, _, body = request("POST", base + "/v1/sessions/down/resolve")
        assert status == 502, body
        after = scrape(base)
        assert _delta(before, after, "ballast_upstream_attempts_total", outcome="status") == 3
        assert _delta(before, after, "ballast_upstream_retries_total") == 2
        assert _delta(before, after, "ballast_upstream_calls_total", outcome="status") == 1
        assert _delta(before, after, "ballast_http_requests_total", route=RESOLVE_ROUTE, status="502") == 1


def test_two_processes_sharing_a_multiprocess_directory_show_the_sum(tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    one = ServerProcess(tmp_path / "one", env=env)
    two = ServerProcess(tmp_path / "two", env=env)
    with one, two:
        for i in range(30):
            target = one if i % 3 else two  # 20 to one, 10 to two
            status, _, _ = request("GET", target.base_url + "/healthz")
            assert status == 200
        _session(one.base_url, "a")
        _session(two.base_url, "b")
        got = scrape(one.base_url)
        also = scrape(two.base_url)
        assert got.total("ballast_http_requests_total", route="/healthz", status="200") == 30
        assert got.total("ballast_http_request_duration_seconds_count", route="/healthz") == 30
        assert got.total("ballast_mutations_committed_total") == 4
        assert also.total("ballast_http_requests_total", route="/healthz") == 30
        # Per-process files, one set per pid.
        assert len(list(shared.glob("counter_*.db"))) == 2
        # A gauge read at scrape time still shows (both executors idle: 0 in use).
        assert got.total("ballast_executor_in_use") == 0
        assert "ballast_executor_in_use" in got.families


def _workers_server(workdir: Path, metrics_dir: Path | None = None) -> ServerProcess:
    env = {"BALLAST__SERVER__WORKERS": "2"}
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return ServerProcess(workdir, env=env)


def _wait_for_workers(server: ServerProcess, n: int = 2, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        started = {line.get("worker") for line in server.logs() if line.get("event") == "server.started"}
        if len(started - {None}) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the workers did not all start")


def test_serve_with_two_workers_shows_the_requests_of_both_in_one_scrape(tmp_path: Path) -> None:
    server = _workers_server(tmp_path / "server")
    with server:
        _wait_for_workers(server)

        def get(_: int) -> int:
            status, _, _ = request("GET", server.base_url + "/healthz")
            return status

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(get, range(100))) == [200] * 100
        served = {line.get("worker") for line in server.logs()
                  if line.get("event") == "http.request" and line.get("route") == "/healthz"}
        assert served == {0, 1}, "both workers answered some of the 100"
        got = scrape(server.base_url)
        assert got.total("ballast_http_requests_total", method="GET", route="/healthz", status="200") == 100
        assert got.total("ballast_http_request_duration_seconds_count", route="/healthz") == 100
        again = scrape(server.base_url)  # whichever worker answers, the same sum
        assert again.total("ballast_http_requests_total", route="/healthz") == 100


def test_serve_with_workers_empties_a_named_metrics_directory_on_start(tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    first = _workers_server(tmp_path / "first", shared)
    with first:
        _wait_for_workers(first)
        for _ in range(5):
            assert request("GET", first.base_url + "/healthz")[0] == 200
        assert scrape(first.base_url).total("ballast_http_requests_total", route="/healthz") == 5
    assert list(shared.glob("*.db")), "the first run left its values there"
    second = _workers_server(tmp_path / "second", shared)
    with second:
        _wait_for_workers(second)
        for _ in range(3):
            assert request("GET", second.base_url + "/healthz")[0] == 200
        assert scrape(second.base_url).total("ballast_http_requests_total", route="/healthz") == 3
