"""tracing: server span -> attempt spans, job span -> stage spans, trace ids in logs and
in the traceparent the upstream receives.

Unit tests build a real app with the tracing plugin (exporter ``none``) and add an
in-memory span exporter to its provider; the black-box tests run ``ballast serve`` and
the fake upstream as processes and read what the fake received and the server's log.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from fake_upstream import FakeUpstream, FakeUpstreamProcess
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import ServerProcess, request, run_cli

from ballast.app import build_app
from ballast.config import load_settings
from ballast.errors import ConfigError
from ballast.keys import TELEMETRY
from ballast.plugin_manager import load_plugins
from ballast.plugins import tracing
from ballast.plugins.tracing import TRACING
from ballast.sessions.finalize import STAGES

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _env(tmp_path: Path, base_url: str = "", **extra: str) -> dict[str, str]:
    env = {"BALLAST__STORAGE__PATH": str(tmp_path / "b.db"),
           "BALLAST__PLUGINS__TRACING__ENABLED": "true",
           "BALLAST__PLUGINS__TRACING__EXPORTER": "none",
           "BALLAST__PLUGINS__RETRY__START_TIMEOUT_S": "0.01",
           "BALLAST__PLUGINS__RETRY__MAX_TIMEOUT_S": "0.02"}
    if base_url:
        env.update({"BALLAST__INFERENCE__PROVIDER": "openai", "BALLAST__INFERENCE__BASE_URL": base_url,
                    "BALLAST__INFERENCE__MODEL": "trace-model"})
    return {**env, **extra}


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


async def _traced_client(tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream,
                         **extra: str) -> tuple[TestClient, InMemorySpanExporter]:
    app = build_app(load_settings(environ=_env(tmp_path, fake.base_url, **extra)))
    spans = InMemorySpanExporter()
    app[TRACING].provider.add_span_processor(SimpleSpanProcessor(spans))
    return await aiohttp_client(app), spans


async def _session(client: TestClient, sid: str) -> None:
    resp = await client.post("/v1/sessions", json={"session_id": sid, "participants": [
        {"name": "Alice"}, {"name": "Bob"}]})
    assert resp.status == 201
    resp = await client.post(f"/v1/sessions/{sid}/mutations", json={"mutations": [
        {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900, "text": "Hi, I'm Alice."},
        {"type": "utterance", "speaker": "spk_1", "start_ms": 1000, "end_ms": 1900, "text": "Bob here."}]})
    assert resp.status == 200


def _hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def _hex_span(span_id: int) -> str:
    return format(span_id, "016x")


async def test_server_span_follows_the_callers_traceparent_and_each_attempt_is_its_child(
        tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream) -> None:
    client, spans = await _traced_client(tmp_path, aiohttp_client, fake)
    await _session(client, "t1")
    spans.clear()
    fake.requests.clear()
    fake.script("503", "ok")
    resp = await client.post("/v1/sessions/t1/resolve", headers={"traceparent": TRACEPARENT})
    assert resp.status == 200

    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind == SpanKind.SERVER]
    assert len(server) == 1
    root = server[0]
    assert root.name == "POST /v1/sessions/{session_id}/resolve"
    assert _hex_trace(root) == TRACE_ID
    assert root.parent is not None and _hex_span(root.parent.span_id) == PARENT_ID
    assert root.attributes is not None and root.attributes["http.response.status_code"] == 200

    attempts = sorted((s for s in finished if s.kind == SpanKind.CLIENT),
                      key=lambda s: s.attributes["ballast.attempt"] if s.attributes else 0)
    assert [s.attributes["ballast.attempt"] for s in attempts if s.attributes] == [1, 2]
    for span in attempts:
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert _hex_trace(span) == TRACE_ID
    assert attempts[0].status.status_code == StatusCode.ERROR  # the 503
    assert attempts[1].status.status_code == StatusCode.UNSET
    # What each attempt sent upstream names that attempt's span as the parent.
    sent = [r.headers["traceparent"] for r in fake.requests]
    assert sent == [f"00-{TRACE_ID}-{_hex_span(s.context.span_id)}-01" for s in attempts]
    # Spans say nothing of hosts or URLs.
    for span in finished:
        for value in (span.attributes or {}).values():
            assert str(fake.port) not in str(value) and "127.0.0.1" not in str(value)


async def test_a_request_without_traceparent_starts_a_new_trace(
        tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream) -> None:
    client, spans = await _traced_client(tmp_path, aiohttp_client, fake)
    assert (await client.get("/healthz")).status == 200
    (root,) = spans.get_finished_spans()
    assert root.parent is None and root.kind == SpanKind.SERVER and root.name == "GET /healthz"
    assert _hex_trace(root) != TRACE_ID


async def test_finalize_job_span_holds_one_span_per_stage(
        tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream) -> None:
    client, spans = await _traced_client(tmp_path, aiohttp_client, fake)
    await _session(client, "t2")
    assert (await client.post("/v1/sessions/t2/finalize")).status == 202
    for _ in range(600):
        job = (await (await client.get("/v1/sessions/t2/finalize")).json())["job"]
        if job["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job["state"] == "succeeded", job
    finished = spans.get_finished_spans()
    (job_span,) = [s for s in finished if s.name == "finalize"]
    stage_spans = [s for s in finished if s.name.startswith("finalize ")]
    assert [s.name for s in sorted(stage_spans, key=lambda s: s.start_time or 0)] == \
        [f"finalize {stage}" for stage in STAGES]
    for span in stage_spans:
        assert span.parent is not None and span.parent.span_id == job_span.context.span_id
        assert span.attributes is not None and span.name == f"finalize {span.attributes['ballast.stage']}"
    # The report stage asked the upstream: that attempt is a child of the stage's span
    # (reconcile may have asked too, to name unnamed speakers: its attempt is its own).
    (report,) = [s for s in stage_spans if s.name == "finalize report"]
    clients = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert clients and all(s.parent is not None and s.parent.span_id in
                           {st.context.span_id for st in stage_spans} for s in clients)
    (attempt,) = [s for s in clients if s.parent is not None and s.parent.span_id == report.context.span_id]
    assert _hex_trace(attempt) == _hex_trace(job_span)


async def test_a_failed_attempt_span_names_the_reason_not_the_error_text(
        tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream) -> None:
    client, spans = await _traced_client(tmp_path, aiohttp_client, fake,
                                         BALLAST__PLUGINS__RETRY__ATTEMPTS="1")
    await _session(client, "t3")
    spans.clear()
    fake.script("reset")
    resp = await client.post("/v1/sessions/t3/resolve")
    assert resp.status >= 500
    finished = spans.get_finished_spans()
    (attempt,) = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert attempt.status.status_code == StatusCode.ERROR
    assert attempt.status.description == "connection"
    assert not attempt.events  # no exception event, no exception text
    (server,) = [s for s in finished if s.kind == SpanKind.SERVER]
    assert server.status.status_code == StatusCode.ERROR


async def test_sampling_ratio_zero_records_nothing_new_but_keeps_a_sampled_callers_trace(
        tmp_path: Path, aiohttp_client: Any, fake: FakeUpstream) -> None:
    client, spans = await _traced_client(tmp_path, aiohttp_client, fake,
                                         BALLAST__PLUGINS__TRACING__SAMPLE_RATIO="0")
    assert (await client.get("/healthz")).status == 200
    assert spans.get_finished_spans() == ()
    assert (await client.get("/healthz", headers={"traceparent": TRACEPARENT})).status == 200
    (root,) = spans.get_finished_spans()
    assert _hex_trace(root) == TRACE_ID


def test_otlp_without_its_extra_is_a_config_error_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, tracing.OTLP_MODULE, None)  # as if not installed
    config = load_settings(environ=_env(tmp_path, BALLAST__PLUGINS__TRACING__EXPORTER="otlp"))
    with pytest.raises(ConfigError, match=r"ballast\[otlp\]") as refused:
        load_plugins(config, eps=[])
    assert "plugins.tracing.exporter" in str(refused.value)


def test_serve_refuses_otlp_without_the_extra(tmp_path: Path) -> None:
    try:
        __import__(tracing.OTLP_MODULE)
    except ImportError:
        pass
    else:
        pytest.skip("the otlp extra is installed here")
    result = run_cli("config", "check", str(_write(tmp_path, "[plugins.tracing]\nenabled = true\n")))
    assert result.returncode == 2
    assert "ballast[otlp]" in result.stderr and "plugins.tracing.exporter" in result.stderr


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ballast.toml"
    path.write_text(text)
    return path


def test_disabled_by_default_no_tracer_is_attached(tmp_path: Path) -> None:
    app = build_app(load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db")}))
    assert app[TELEMETRY].tracer is None
    assert TRACING not in app


# ------------------------------------------------------------------------------ black box


def _openai(base_url: str, tracing_on: bool) -> str:
    return ("[inference]\n"
            'provider = "openai"\n'
            f'base_url = "{base_url}"\n'
            'model = "trace-model"\n'
            "[plugins.retry]\n"
            "start_timeout_s = 0.01\n"
            "max_timeout_s = 0.02\n"
            "[plugins.tracing]\n"
            f"enabled = {'true' if tracing_on else 'false'}\n"
            'exporter = "none"\n')


def _start_session(base: str, sid: str) -> None:
    status, _, body = request("POST", base + "/v1/sessions", {"session_id": sid, "participants": [
        {"name": "Alice"}]})
    assert status == 201, body
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/mutations", {"mutations": [
        {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900, "text": "Hi, I'm Alice."}]})
    assert status == 200, body


def test_the_trace_id_reaches_the_upstream_and_every_log_line_of_the_request(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake, \
            ServerProcess(tmp_path / "server", config=_openai(fake.base_url, True)) as server:
        _start_session(server.base_url, "bb")
        fake.reset()
        fake.script("503", "ok")
        status, headers, body = request("POST", server.base_url + "/v1/sessions/bb/resolve",
                                        headers={"traceparent": TRACEPARENT})
        assert status == 200, body
        sent = [r["headers"].get("traceparent") or r["headers"].get("Traceparent") for r in fake.requests()]
        assert len(sent) == 2
        for value in sent:
            version, trace_id, span_id, flags = value.split("-")
            assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
            assert span_id != PARENT_ID  # the attempt's own span, a child of the server span
        assert sent[0] != sent[1]  # one client span per attempt
        rid = headers["X-Request-ID"]
    lines = [line for line in server.logs() if line.get("request_id") == rid]
    (canonical,) = [line for line in lines if line["event"] == "http.request"]
    assert canonical["trace_id"] == TRACE_ID and len(canonical["span_id"]) == 16
    retry_lines = [line for line in lines if line["event"] == "upstream.retry"]
    assert retry_lines, [line["event"] for line in lines]
    for line in lines:
        assert line.get("trace_id") == TRACE_ID, line


def test_disabled_nothing_is_propagated_and_logs_carry_no_trace_id(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake, \
            ServerProcess(tmp_path / "server", config=_openai(fake.base_url, False)) as server:
        _start_session(server.base_url, "off")
        fake.reset()
        status, _, body = request("POST", server.base_url + "/v1/sessions/off/resolve",
                                  headers={"traceparent": TRACEPARENT})
        assert status == 200, body
        (sent,) = fake.requests()
        assert not any(k.lower() == "traceparent" for k in sent["headers"])
    canonical = [line for line in server.logs() if line["event"] == "http.request"]
    assert canonical and not any("trace_id" in line for line in canonical)


class _Collector:
    """A minimal OTLP/HTTP traces receiver on loopback: keeps every export request body."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                if self.path == "/v1/traces":
                    bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        found = []
        for body in self.bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    found.extend(scope_spans.spans)
        return found


def test_the_otlp_exporter_sends_the_spans_to_the_collector(tmp_path: Path) -> None:
    pytest.importorskip(tracing.OTLP_MODULE, reason="the otlp extra (ballast[otlp]) is not installed")
    with _Collector() as collector:
        config = ("[plugins.tracing]\nenabled = true\nexporter = \"otlp\"\n"
                  f'endpoint = "http://127.0.0.1:{collector.port}/v1/traces"\n')
        server = ServerProcess(tmp_path / "server", config=config)
        with server:
            status, _, _ = request("GET", server.base_url + "/healthz", headers={"traceparent": TRACEPARENT})
            assert status == 200
        # Stopping the server flushes the batch of spans to the collector.
        spans = collector.spans()
    (health,) = [s for s in spans if s.name == "GET /healthz"]
    assert health.trace_id.hex() == TRACE_ID
    assert health.parent_span_id.hex() == PARENT_ID


def test_make_exporter_follows_the_setting() -> None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert tracing.make_exporter(tracing.Settings(enabled=True, exporter="none")) is None
    console = tracing.make_exporter(tracing.Settings(enabled=True, exporter="console"))
    assert isinstance(console, ConsoleSpanExporter)
    assert console.out is sys.stderr  # stdout is the JSON log
    with pytest.raises(ValueError):
        tracing.Settings(enabled=True, exporter="zipkin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tracing.Settings(enabled=True, sample_ratio=1.5)
