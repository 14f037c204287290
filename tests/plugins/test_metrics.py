"""metrics: the Prometheus exporter, /metrics, and what the core and plugins record.

In-process tests drive a real app through aiohttp's test client and parse the real
exposition with prometheus_client.parser (tests/metrics_support.py). The black-box test
of the issue (a resolve that meets 503, 503, 200, then a finalize) and the multiprocess
test run real ``ballast serve`` processes in tests/plugins/test_metrics_server.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from metrics_support import CONTENT_TYPE, Scrape

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import Overloaded
from ballast.executor import LoopDefaultExecutor
from ballast.keys import EXECUTOR, TELEMETRY
from ballast.plugins.bulkhead import BoundedExecutor
from ballast.plugins.metrics import EXPORTER, PrometheusExporter
from ballast.telemetry import METRICS, Telemetry

SESSION_ROUTE = "/v1/sessions/{session_id}"


async def _until(condition: Any, within_s: float = 10.0) -> None:
    """Let the loop run until ``condition()`` holds (a wait, not a timing assertion)."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _config(tmp_path: Path, **env: str) -> Any:
    return load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db"), **env})


@pytest.fixture
async def client(tmp_path: Path, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(build_app(_config(tmp_path)))


async def _scrape(client: TestClient) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE
    return Scrape(await resp.text())


async def test_every_catalogue_metric_is_exported_with_its_type(client: TestClient) -> None:
    got = await _scrape(client)
    for name, spec in METRICS.items():
        family = name.removesuffix("_total") if spec.type == "counter" else name
        assert got.families.get(family) == spec.type, name
    # No *_created series: they double the output and nothing graphs them.
    assert not [n for n, _, _ in got.samples if n.endswith("_created")]


async def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    before = await _scrape(client)
    for _ in range(3):
        assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v1/sessions/nope-1")).status == 404
    assert (await client.get("/v1/sessions/nope-2")).status == 404
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.request("PROPFIND", "/healthz")).status == 405
    after = await _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert delta("ballast_http_requests_total", method="GET", route="/healthz", status="200") == 3
    # The template, never the raw path: both unknown sessions land on one series.
    assert delta("ballast_http_requests_total", method="GET", route=SESSION_ROUTE, status="404") == 2
    assert "/v1/sessions/nope-1" not in after.text
    assert delta("ballast_http_requests_total", route="(unmatched)", status="404") == 1
    assert delta("ballast_http_requests_total", method="OTHER", status="405") == 1
    assert delta("ballast_http_request_duration_seconds_count", route="/healthz") == 3
    assert delta("ballast_http_request_duration_seconds_bucket", route="/healthz", le="+Inf") == 3
    assert delta("ballast_http_request_duration_seconds_sum", route="/healthz") > 0
    # The scrape before was itself counted once by the time of the scrape after.
    assert after.total("ballast_http_requests_total", route="/metrics", status="200") == 1


async def test_mutations_committed_excludes_repeated_ids(client: TestClient) -> None:
    assert (await client.post("/v1/sessions", json={"session_id": "m"})).status == 201
    utterance = {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 10, "text": "hi"}
    batch = [{**utterance, "id": f"u{i}"} for i in range(3)]
    assert (await client.post("/v1/sessions/m/mutations", json={"mutations": batch})).status == 200
    # A retried batch: two known ids, one new.
    again = [*batch[:2], {**utterance, "id": "u9"}]
    assert (await client.post("/v1/sessions/m/mutations", json={"mutations": again})).status == 200
    got = await _scrape(client)
    assert got.total("ballast_mutations_committed_total") == 4
    assert got.total("ballast_commit_batch_size_count") == 2
    assert got.total("ballast_commit_batch_size_sum") == 4


async def test_finalize_counts_the_job_and_times_each_stage(client: TestClient) -> None:
    assert (await client.post("/v1/sessions", json={"session_id": "f", "participants": [
        {"name": "Alice"}]})).status == 201
    utterance = {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900,
                 "text": "Hi, I'm Alice."}
    assert (await client.post("/v1/sessions/f/mutations", json={"mutations": [utterance]})).status == 200
    assert (await client.post("/v1/sessions/f/finalize")).status == 202
    job = (await (await client.get("/v1/sessions/f/finalize?wait=10")).json())["job"]
    for _ in range(600):
        if job["state"] != "running":
            break
        await asyncio.sleep(0.05)
        job = (await (await client.get("/v1/sessions/f/finalize")).json())["job"]
    assert job["state"] == "succeeded", job
    got = await _scrape(client)
    assert got.total("ballast_finalize_jobs_total", outcome="succeeded") == 1
    assert got.total("ballast_finalize_jobs_total") == 1
    stages = [s["name"] for s in job["stages"]]
    assert got.label_values("ballast_finalize_stage_duration_seconds_count", "stage") == set(stages)
    for stage in stages:
        assert got.total("ballast_finalize_stage_duration_seconds_count", stage=stage) == 1, stage


async def test_executor_gauges_are_read_at_scrape_and_rejections_counted(
        tmp_path: Path, aiohttp_client: Any) -> None:
    app = build_app(_config(tmp_path, BALLAST__PLUGINS__BULKHEAD__MAX_WORKERS="1",
                            BALLAST__PLUGINS__BULKHEAD__MAX_QUEUE="1"))
    client = await aiohttp_client(app)
    executor = app[EXECUTOR]
    assert isinstance(executor, BoundedExecutor)
    release = threading.Event()
    busy = asyncio.ensure_future(executor.run(release.wait, 10))
    queued = asyncio.ensure_future(executor.run(release.wait, 10))
    await _until(lambda: executor.in_flight == 2)
    with pytest.raises(Overloaded):
        await executor.run(release.wait, 10)
    got = await _scrape(client)
    assert got.total("ballast_executor_in_use") == 1
    assert got.total("ballast_executor_queued") == 1
    assert got.total("ballast_executor_rejected_total") == 1
    release.set()
    await asyncio.gather(busy, queued)
    await _until(lambda: executor.in_flight == 0)  # the pool's done-callbacks run on the loop
    got = await _scrape(client)
    assert got.total("ballast_executor_in_use") == 0
    assert got.total("ballast_executor_queued") == 0


async def test_the_default_executor_reports_its_work_in_use(tmp_path: Path, aiohttp_client: Any) -> None:
    app = build_app(_config(tmp_path, BALLAST__PLUGINS__BULKHEAD__ENABLED="false"))
    client = await aiohttp_client(app)
    release = threading.Event()
    fallback = app[EXECUTOR]
    assert isinstance(fallback, LoopDefaultExecutor)
    work = asyncio.ensure_future(fallback.run(release.wait, 10))
    await _until(lambda: fallback.in_flight == 1)
    assert (await _scrape(client)).total("ballast_executor_in_use") == 1
    release.set()
    await work
    assert (await _scrape(client)).total("ballast_executor_in_use") == 0


async def test_disabled_there_is_no_endpoint_and_nothing_is_attached(
        tmp_path: Path, aiohttp_client: Any) -> None:
    app = build_app(_config(tmp_path, BALLAST__PLUGINS__METRICS__ENABLED="false"))
    client = await aiohttp_client(app)
    assert app[TELEMETRY].exporter is None
    assert EXPORTER not in app
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 404


async def test_each_app_has_a_registry_of_its_own(tmp_path: Path, aiohttp_client: Any) -> None:
    one = await aiohttp_client(build_app(_config(tmp_path / "one")))
    two = await aiohttp_client(build_app(_config(tmp_path / "two")))
    await one.get("/healthz")
    await one.get("/healthz")
    assert (await _scrape(one)).total("ballast_http_requests_total", route="/healthz") == 2
    assert (await _scrape(two)).total("ballast_http_requests_total", route="/healthz") == 0


def test_exporter_records_every_instrument_kind_in_catalogue_label_order() -> None:
    telemetry = Telemetry()
    level = {"value": 3.0}
    telemetry.gauge("ballast_concurrency_limit").sample(lambda: level["value"])  # before attach
    exporter = PrometheusExporter()
    telemetry.attach(exporter)
    telemetry.counter("ballast_upstream_retries_total").inc("inference", "status")
    telemetry.counter("ballast_upstream_retries_total").inc("inference", "status", amount=2)
    telemetry.gauge("ballast_circuit_state").set(2, "inference")
    telemetry.histogram("ballast_commit_batch_size").observe(7)
    level["value"] = 5.0
    got = Scrape(exporter.scrape().decode())
    assert got.total("ballast_upstream_retries_total", upstream="inference", reason="status") == 3
    assert got.total("ballast_circuit_state", upstream="inference") == 2
    assert got.total("ballast_commit_batch_size_bucket", le="10.0") == 1
    assert got.total("ballast_commit_batch_size_bucket", le="5.0") == 0
    assert got.total("ballast_concurrency_limit") == 5  # read at scrape time


def test_bound_recorders_add_to_the_same_series_as_the_instruments() -> None:
    telemetry = Telemetry()
    requests = telemetry.counter("ballast_http_requests_total")
    duration = telemetry.histogram("ballast_http_request_duration_seconds")
    assert requests.bound("GET", "/x", "200") is None, "nothing to bind to without an exporter"
    exporter = PrometheusExporter()
    telemetry.attach(exporter)
    inc = requests.bound("GET", "/x", "200")
    observe = duration.bound("/x")
    assert inc is not None and observe is not None
    inc(1.0)
    inc(2.0)
    requests.inc("GET", "/x", "200")
    observe(0.003)
    observe(float("nan"))  # in no bucket, as the unbound path
    duration.observe(0.2, "/x")
    with pytest.raises(ValueError):
        inc(-1.0)
    got = Scrape(exporter.scrape().decode())
    assert got.total("ballast_http_requests_total", method="GET", route="/x", status="200") == 4
    assert got.total("ballast_http_request_duration_seconds_count", route="/x") == 2
    assert got.total("ballast_http_request_duration_seconds_bucket", route="/x", le="0.005") == 1
    with pytest.raises(TypeError):
        exporter.bind(METRICS["ballast_concurrency_limit"], ())


def test_without_an_exporter_recording_is_a_no_op() -> None:
    telemetry = Telemetry()
    telemetry.counter("ballast_http_requests_total").inc("GET", "/x", "200")
    telemetry.histogram("ballast_http_request_duration_seconds").observe(0.1, "/x")
    exporter = PrometheusExporter()
    telemetry.attach(exporter)
    assert Scrape(exporter.scrape().decode()).total("ballast_http_requests_total") == 0


def test_metrics_route_is_a_plain_get(tmp_path: Path) -> None:
    app = build_app(_config(tmp_path))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    assert ("GET", "/metrics") in routes
    assert isinstance(app[EXPORTER], PrometheusExporter)
    assert isinstance(app, web.Application)


_WRITER = """
import sys
from ballast.plugins.metrics import PrometheusExporter
from ballast.telemetry import Telemetry

directory, state, busy = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
telemetry = Telemetry()
telemetry.gauge("ballast_executor_in_use").sample(lambda: busy)
exporter = PrometheusExporter(multiproc_dir=directory)
telemetry.attach(exporter)
telemetry.gauge("ballast_circuit_state").set(state, "openai")
telemetry.counter("ballast_executor_rejected_total").inc()
bound = telemetry.counter("ballast_upstream_retries_total").bound("openai", "status")
bound(2.0)  # a bound recorder writes the same shared files
if len(sys.argv) > 4:
    sys.stdout.write(exporter.scrape().decode())
"""


def test_multiprocess_gauges_sum_quantities_and_keep_the_worst_state(tmp_path: Path) -> None:
    """Three processes on one directory (a fresh interpreter each: the mode is per process)."""
    import subprocess
    import sys

    def run(state: int, busy: int, *scrape: str) -> str:
        args = [sys.executable, "-c", _WRITER, str(tmp_path), str(state), str(busy), *scrape]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
        return result.stdout

    run(2, 3)  # this process saw the circuit open, 3 threads busy
    run(0, 4)
    got = Scrape(run(1, 0, "scrape"))
    assert got.total("ballast_executor_in_use") == 7  # summed
    assert got.total("ballast_circuit_state", upstream="openai") == 2  # the worst
    assert got.total("ballast_executor_rejected_total") == 3
    assert got.total("ballast_upstream_retries_total", upstream="openai", reason="status") == 6
