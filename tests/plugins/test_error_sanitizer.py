"""error_sanitizer: no exception text, path, host or secret ever reaches a client.

The app is built from a real config and the real plugin manager, with a third-party
test plugin (:class:`Boom`) registered beside the builtins that fails on demand in its
own middleware, in a route it adds and in an upstream wrapper. Inference goes to the
fake upstream over loopback, failing in every way it can.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import INTERNAL_MARKER, FakeUpstream, FakeUpstreamProcess, Step
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs
from support import ServerProcess, request

from ballast.app import build_app, request_context
from ballast.config import Config, load_settings
from ballast.errors import (
    BallastError,
    BudgetExceeded,
    Overloaded,
    StoreError,
    UpstreamError,
)
from ballast.hookspecs import hookimpl
from ballast.middleware import Handler, MiddlewareSpec
from ballast.plugin_manager import load_plugins
from ballast.plugins import error_sanitizer
from ballast.problems import GENERIC, PROBLEM_CONTENT_TYPE
from ballast.sessions.service import RESOLVE_UNAVAILABLE
from ballast.telemetry import Telemetry
from ballast.upstream import UpstreamCall, UpstreamRequest, UpstreamResponse

API_KEY_ENV = "BALLAST_TEST_SANITIZER_KEY"
API_KEY = "sk-sanitizer-5f3c9e1d7a2b4c6e"
SECRET = "hunter2-db-password"
SECRET_PATH = "/srv/ballast/internal/secrets.py"
LOCAL_SECRET = "local-variable-secret-7731"
#: Retries kept to milliseconds: the sweep plays every fault twice per endpoint.
FAST_RETRY = {"BALLAST__PLUGINS__RETRY__ATTEMPTS": "2",
              "BALLAST__PLUGINS__RETRY__START_TIMEOUT_S": "0.01",
              "BALLAST__PLUGINS__RETRY__MAX_TIMEOUT_S": "0.02",
              "BALLAST__PLUGINS__RETRY__MAX_RETRY_AFTER_S": "0.05",
              "BALLAST__PLUGINS__RETRY__JITTER": "false"}
PROBLEM_KEYS = {"type", "title", "status", "detail", "request_id"}
INTERNAL_ERRORS: dict[str, BaseException] = {
    "RuntimeError": RuntimeError(f"password {SECRET} rejected at {SECRET_PATH}"),
    "KeyError": KeyError(f"{SECRET} not in {SECRET_PATH}"),
    "OSError": OSError(2, f"No such file: {SECRET_PATH}"),
    "ZeroDivisionError": ZeroDivisionError(f"division by zero in {SECRET_PATH}"),
    "StoreError": StoreError(internal=f"UNIQUE constraint failed: sessions ({SECRET_PATH})"),
    "Overloaded": Overloaded(7, internal=f"pool {SECRET} is full"),
    "BudgetExceeded": BudgetExceeded(internal=f"{SECRET_PATH} exceeded its budget"),
    "UpstreamError": UpstreamError(internal=f"upstream at 10.0.0.7:8443 said {SECRET}"),
}


class Boom:
    """A third-party plugin that fails on request, wherever the test asks."""

    def __init__(self, order: int = 150) -> None:
        self.order = order
        self.wrapper_armed = False

    @hookimpl
    def ballast_middlewares(self, config: Config) -> list[MiddlewareSpec]:
        return [MiddlewareSpec("boom", self.order, self.middleware)]

    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.headers.get("X-Boom")
        if name is not None:
            raise INTERNAL_ERRORS[name]
        return await handler(request)

    @hookimpl
    def ballast_app_built(self, app: web.Application, config: Config) -> None:
        app.router.add_get("/boom", self.handler)

    async def handler(self, request: web.Request) -> web.Response:
        password = LOCAL_SECRET  # a local that a traceback with locals would show
        if request.query.get("fail"):
            raise RuntimeError(f"handler failed reading {SECRET_PATH}")
        return web.json_response({"password_length": len(password)})

    @hookimpl
    def ballast_upstream_wrappers(self, config: Config) -> list[Any]:
        def wrap(call: UpstreamCall) -> UpstreamCall:
            async def wrapped(req: UpstreamRequest) -> UpstreamResponse:
                if self.wrapper_armed:
                    raise RuntimeError(f"wrapper saw key {API_KEY} for {req.url}")
                return await call(req)

            return wrapped

        return [wrap]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def make_config(tmp_path: Path, fake: FakeUpstream | None = None, **env: str) -> Config:
    path = tmp_path / "ballast.toml"
    path.write_text("")
    environ = {"BALLAST__STORAGE__PATH": str(tmp_path / "ballast.db"),
               "BALLAST__STORAGE__DURABILITY": "normal", **FAST_RETRY}
    if fake is not None:
        environ.update({"BALLAST__INFERENCE__PROVIDER": "openai",
                        "BALLAST__INFERENCE__BASE_URL": fake.base_url,
                        "BALLAST__INFERENCE__MODEL": "fake-model",
                        "BALLAST__INFERENCE__API_KEY_ENV": API_KEY_ENV,
                        "BALLAST__INFERENCE__TIMEOUT_MS": "300"})
    environ.update(env)
    return load_settings(path, environ=environ)


async def start(aiohttp_client: AiohttpClient, config: Config,
                boom: Boom | None = None) -> TestClient[Any, Any]:
    """The app from ``config`` and the real plugin manager, plus ``boom`` if given."""
    plugins = load_plugins(config, eps=[], extra=[("boom", boom)] if boom is not None else [])
    return await aiohttp_client(build_app(config, plugins))


def with_context() -> Any:
    """capture_logs that also sees the bound request id, as the real log lines do."""
    return capture_logs(processors=[structlog.contextvars.merge_contextvars])


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def problem(resp: Any, status: int) -> dict[str, Any]:
    """Check the response is an RFC 9457 problem with the header's request id; return it."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    body: dict[str, Any] = json.loads(text)
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


def assert_no_leak(body: str, headers: Any = None, fake: FakeUpstream | None = None) -> None:
    """Neither the body nor the headers hold internals; the body holds no path at all."""
    forbidden = ["Error", "Exception", "Traceback", ".py", "/srv", SECRET, LOCAL_SECRET,
                 API_KEY, INTERNAL_MARKER, "10.0.0.7", "worker-7"]
    if fake is not None:
        forbidden.append(f"{fake.host}:{fake.port}")
    header_text = json.dumps(dict(headers or {}))
    for needle in forbidden:
        assert needle not in body, f"{needle!r} leaked into {body!r}"
        assert needle not in header_text, f"{needle!r} leaked into {header_text!r}"
    assert "/" not in body, f"a path in {body!r}"


async def new_session(client: TestClient[Any, Any], sid: str) -> None:
    resp = await client.post("/v1/sessions", json={
        "session_id": sid, "title": "Weekly sync",
        "participants": [{"name": "Alice"}, {"name": "Bob"}]})
    assert resp.status == 201, await resp.text()
    resp = await client.post(f"/v1/sessions/{sid}/mutations", json={"mutations": [
        {"id": "u1", "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900,
         "text": "Hi, I am Alice."},
        {"id": "u2", "type": "utterance", "speaker": "spk_1", "start_ms": 1000, "end_ms": 1900,
         "text": "This is Bob, I will send the notes."}]})
    assert resp.status == 200, await resp.text()


async def finished_job(client: TestClient[Any, Any], sid: str,
                       within: float = 20.0) -> tuple[str, dict[str, Any]]:
    """Poll the job until it ends; return the last raw body and the job."""
    deadline = time.monotonic() + within
    while True:
        resp = await client.get(f"/v1/sessions/{sid}/finalize")
        text = await resp.text()
        assert resp.status == 200, text
        job: dict[str, Any] = json.loads(text)["job"]
        if job["state"] != "running":
            return text, job
        assert time.monotonic() < deadline, f"job still running after {within}s: {job}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, API_KEY)


# --------------------------------------------------------------------------------------
# unexpected exceptions: generic 500, full error in the log, next request fine
# --------------------------------------------------------------------------------------


async def test_an_exception_in_another_plugins_middleware_is_a_generic_500(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, make_config(tmp_path), Boom())
    with with_context() as logs:
        resp = await client.get("/healthz", headers={"X-Boom": "RuntimeError",
                                                     "X-Request-ID": "client-trace-0001"})
        body = await problem(resp, 500)
    assert body == {"type": "about:blank", "title": GENERIC[500][0], "status": 500,
                    "detail": GENERIC[500][1], "request_id": "client-trace-0001"}
    assert_no_leak(await resp.text(), resp.headers)

    [line] = events(logs, "error.unhandled")
    assert line["request_id"] == "client-trace-0001"
    assert (line["error_type"], line["status"]) == ("RuntimeError", 500)
    assert SECRET in line["error"] and SECRET_PATH in line["error"]
    assert line["traceback"].startswith("Traceback")
    assert 'File "test_error_sanitizer", line' in line["traceback"]  # where it was raised, by module
    assert str(Path(__file__).parent) not in line["traceback"]  # ... and no file path
    assert 'File "ballast.plugins.error_sanitizer", line' in line["traceback"]

    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_an_exception_in_a_handler_is_a_generic_500_and_locals_stay_out_of_the_log(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, make_config(tmp_path), Boom())
    with with_context() as logs:
        resp = await client.get("/boom", params={"fail": "1"})
        body = await problem(resp, 500)
    assert (body["title"], body["detail"]) == GENERIC[500]
    assert_no_leak(await resp.text(), resp.headers)
    [line] = events(logs, "error.unhandled")
    assert line["request_id"] == body["request_id"]
    assert line["error"] == f"handler failed reading {SECRET_PATH}"
    assert "in handler" in line["traceback"]
    assert LOCAL_SECRET not in line["traceback"]

    resp = await client.get("/boom")
    assert resp.status == 200
    assert await resp.json() == {"password_length": len(LOCAL_SECRET)}


async def test_an_exception_in_a_hooked_upstream_wrapper_is_a_generic_500(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    boom = Boom()
    client = await start(aiohttp_client, make_config(tmp_path, fake), boom)
    await new_session(client, "s1")
    boom.wrapper_armed = True
    with with_context() as logs:
        resp = await client.post("/v1/sessions/s1/resolve")
        body = await problem(resp, 500)
    assert (body["title"], body["detail"]) == GENERIC[500]
    assert_no_leak(await resp.text(), resp.headers, fake)
    [line] = events(logs, "error.unhandled")
    assert line["request_id"] == body["request_id"]
    assert line["error_type"] == "RuntimeError"
    assert fake.attempts == 0

    boom.wrapper_armed = False
    resp = await client.post("/v1/sessions/s1/resolve")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["speakers"] == {"spk_0": "Alice", "spk_1": "Bob"}


@pytest.mark.parametrize("name", sorted(INTERNAL_ERRORS))
async def test_each_error_class_reads_the_same_generic_text_every_time(
        name: str, tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, make_config(tmp_path), Boom())
    exc = INTERNAL_ERRORS[name]
    status = exc.status if isinstance(exc, BallastError) else 500
    bodies = []
    for _ in range(2):
        resp = await client.get("/healthz", headers={"X-Boom": name})
        body = await problem(resp, status)
        assert_no_leak(await resp.text(), resp.headers)
        bodies.append({k: v for k, v in body.items() if k != "request_id"})
    assert bodies[0] == bodies[1]
    if isinstance(exc, BallastError):
        assert (bodies[0]["title"], bodies[0]["detail"]) == (exc.title, exc.public_detail)
    else:
        assert (bodies[0]["title"], bodies[0]["detail"]) == GENERIC[500]
    if isinstance(exc, Overloaded):
        assert resp.headers["Retry-After"] == "7"


async def test_error_unhandled_is_logged_for_5xx_typed_errors_with_their_internal_detail(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, make_config(tmp_path), Boom())
    with with_context() as logs:
        resp = await client.get("/healthz", headers={"X-Boom": "StoreError"})
        body = await problem(resp, 500)
    [line] = events(logs, "error.unhandled")
    assert line["request_id"] == body["request_id"]
    assert line["error_type"] == "StoreError"
    assert "UNIQUE constraint failed" in line["error"]
    assert line["status"] == 500


# --------------------------------------------------------------------------------------
# client errors keep their explanation; every non-2xx is a problem
# --------------------------------------------------------------------------------------


async def test_every_client_error_is_a_problem_that_says_what_is_wrong(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, make_config(tmp_path, BALLAST__SERVER__MAX_BODY_BYTES="2048"))
    await new_session(client, "s1")

    body = await problem(await client.post("/v1/sessions/s1/mutations", json={"mutations": [
        {"type": "utterance", "speaker": "spk_0", "start_ms": -5, "end_ms": 10, "text": "x"}]}), 422)
    assert any(e["field"].endswith("start_ms") for e in body["errors"]), body
    assert "start_ms" in body["detail"]

    body = await problem(await client.post("/v1/sessions", json={"session_id": "bad id!"}), 422)
    assert "session_id" in body["detail"]

    body = await problem(await client.post("/v1/sessions/s1/mutations", data=b"{not json",
                                           headers={"Content-Type": "application/json"}), 400)
    assert "not valid JSON" in body["detail"]

    body = await problem(await client.post("/v1/sessions/s1/mutations", data=b"x",
                                           headers={"Content-Type": "text/plain"}), 415)
    body = await problem(await client.post("/v1/sessions/s1/mutations", data=b"[" * 4096,
                                           headers={"Content-Type": "application/json"}), 413)
    assert "2048" in body["detail"]

    body = await problem(await client.get("/v1/sessions/nobody"), 404)
    assert "nobody" in body["detail"]
    body = await problem(await client.post("/v1/sessions", json={"session_id": "s1"}), 409)
    assert "s1" in body["detail"]
    body = await problem(await client.get("/v1/sessions/s1/report"), 404)
    await problem(await client.get("/no/such/route"), 404)
    resp = await client.put("/v1/sessions/s1/resolve")
    await problem(resp, 405)
    assert "POST" in resp.headers["Allow"]


# --------------------------------------------------------------------------------------
# upstream failures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "malformed"])
async def test_resolve_upstream_failure_is_a_502_with_a_fixed_detail(
        fault: str, tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    client = await start(aiohttp_client, make_config(tmp_path, fake))
    await new_session(client, "s1")
    fake.default = Step.parse(fault)
    with with_context() as logs:
        resp = await client.post("/v1/sessions/s1/resolve")
        body = await problem(resp, 502)
    assert body["detail"] == RESOLVE_UNAVAILABLE == "Speaker resolution temporarily unavailable"
    assert body["title"] == UpstreamError.title
    assert_no_leak(await resp.text(), resp.headers, fake)
    [line] = events(logs, "error.unhandled")
    assert line["request_id"] == body["request_id"]
    assert (line["error_type"], line["status"]) == ("UpstreamError", 502)
    assert fake.attempts >= 1

    fake.default = Step.ok()  # the next request is served normally
    resp = await client.post("/v1/sessions/s1/resolve")
    assert resp.status == 200


async def test_finalize_upstream_failure_is_a_generic_job_error(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    client = await start(aiohttp_client, make_config(tmp_path, fake))
    await new_session(client, "s1")
    fake.default = Step.status(500)
    resp = await client.post("/v1/sessions/s1/finalize")
    assert resp.status == 202
    text, job = await finished_job(client, "s1")
    assert job["state"] == "failed"
    assert job["error"] == {"title": "Report generation unavailable",
                            "detail": "The inference service was temporarily unavailable; "
                                      "run finalize again."}
    assert [s["state"] for s in job["stages"] if s["name"] == "report"] == ["failed"]
    assert_no_leak(text, fake=fake)


FAULTS = ["400", "401", "429:1", "500", "503", "hang", "reset", "truncated", "truncated:length",
          "malformed", "wrong_shape", "slow_body:3", "not_json_content"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_no_upstream_fault_leaks_into_any_response(
        fault: str, tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    client = await start(aiohttp_client, make_config(tmp_path, fake))
    await new_session(client, "s1")
    fake.default = Step.parse(fault)
    seen: list[tuple[str, Any]] = []

    resp = await client.post("/v1/sessions/s1/resolve")
    seen.append((await resp.text(), resp.headers))
    body = await problem(resp, 502)
    assert body["detail"] == RESOLVE_UNAVAILABLE

    resp = await client.post("/v1/sessions/s1/finalize")
    assert resp.status == 202
    seen.append((await resp.text(), resp.headers))
    text, job = await finished_job(client, "s1")
    seen.append((text, None))
    assert job["state"] == "failed"
    assert job["error"]["title"] == "Report generation unavailable"

    for path in ("/v1/sessions/s1", "/v1/sessions/s1/report"):
        resp = await client.get(path)
        seen.append((await resp.text(), resp.headers))
    assert fake.attempts >= 2  # both endpoints reached the fault
    for text, headers in seen:
        assert_no_leak(text, headers, fake)


# --------------------------------------------------------------------------------------
# a real server: the log line that holds the error has the response's request id
# --------------------------------------------------------------------------------------


def test_the_server_log_holds_the_full_error_under_the_responses_request_id(tmp_path: Path) -> None:
    with FakeUpstreamProcess(default="503") as upstream:
        config = (f'[inference]\nprovider = "openai"\nbase_url = "{upstream.base_url}"\n'
                  f'model = "m"\napi_key_env = "{API_KEY_ENV}"\ntimeout_ms = 2000\n'
                  '[plugins.retry]\nattempts = 2\nstart_timeout_s = 0.01\njitter = false\n')
        with ServerProcess(tmp_path, config, env={API_KEY_ENV: API_KEY}) as server:
            base = server.base_url
            request("POST", f"{base}/v1/sessions", {"session_id": "s1",
                                                     "participants": [{"name": "Alice"}]})
            request("POST", f"{base}/v1/sessions/s1/mutations", {"mutations": [
                {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 5,
                 "text": "I am Alice"}]})
            status, headers, body = request("POST", f"{base}/v1/sessions/s1/resolve",
                                            headers={"X-Request-ID": "trace-resolve-0042"})
            ok_status, _, _ = request("GET", f"{base}/v1/sessions/s1")
        assert upstream.attempts == 2
        origin = f"{upstream.host}:{upstream.port}"
    assert status == 502
    assert headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    assert headers["X-Request-ID"] == body["request_id"] == "trace-resolve-0042"
    assert body["detail"] == RESOLVE_UNAVAILABLE
    assert_no_leak(json.dumps(body), headers)
    assert origin not in json.dumps(body)
    assert ok_status == 200

    [line] = [e for e in server.logs() if e["event"] == "error.unhandled"]
    assert line["request_id"] == "trace-resolve-0042"
    assert (line["error_type"], line["status"], line["level"]) == ("UpstreamError", 502, "error")
    assert "answered 503" in line["error"]
    assert "Traceback" in line["traceback"] and 'File "ballast.plugins.retry", line' in line["traceback"]
    [canonical] = [e for e in server.logs() if e["event"] == "http.request"
                   and e["request_id"] == "trace-resolve-0042"]
    assert canonical["status"] == 502
    assert API_KEY not in server.raw_logs()


# --------------------------------------------------------------------------------------
# disabled, order, and the hook
# --------------------------------------------------------------------------------------


async def test_disabled_typed_errors_stay_problems_but_a_crash_is_aiohttps_plain_500(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    config = make_config(tmp_path, BALLAST__PLUGINS__ERROR_SANITIZER__ENABLED="false")
    client = await start(aiohttp_client, config, Boom())
    await problem(await client.get("/healthz", headers={"X-Boom": "Overloaded"}), 503)
    await problem(await client.get("/v1/sessions/nobody"), 404)
    with with_context() as logs:
        resp = await client.get("/healthz", headers={"X-Boom": "RuntimeError"})
    assert resp.status == 500
    assert not resp.headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    assert events(logs, "error.unhandled") == []


async def test_a_middleware_ordered_outside_the_sanitizer_is_not_sanitized(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    # Lower order is outer: at 50 the boom middleware sits outside the sanitizer (100).
    client = await start(aiohttp_client, make_config(tmp_path), Boom(order=50))
    resp = await client.get("/healthz", headers={"X-Boom": "RuntimeError"})
    assert resp.status == 500
    assert not resp.headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    # Typed errors are still turned into problems by the core, outermost of all.
    await problem(await client.get("/healthz", headers={"X-Boom": "BudgetExceeded"}), 504)


async def test_hook_ballast_middlewares(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    config = make_config(tmp_path, BALLAST__PLUGINS__ERROR_SANITIZER__MAX_TRACEBACK_FRAMES="2")
    boom = Boom(order=150)
    plugins = load_plugins(config, eps=[], extra=[("boom", boom)])
    groups = plugins.hook.ballast_middlewares(config=config, telemetry=Telemetry())
    specs = [s for group in groups for s in group]
    by_order = sorted(specs, key=lambda s: s.order)
    assert [(s.name, s.order) for s in by_order] == [
        ("error_sanitizer", 100), ("boom", 150), ("adaptive_concurrency", 150), ("timeout_budget", 200)]

    [own] = error_sanitizer.ballast_middlewares(config=config)
    assert (own.name, own.order) == ("error_sanitizer", error_sanitizer.ORDER)

    app = build_app(config, plugins)
    assert app.middlewares[0] is request_context  # the core is outermost of all
    assert len(app.middlewares) == 1 + len(specs)

    client = await aiohttp_client(app)
    with with_context() as logs:
        await problem(await client.get("/boom", params={"fail": "1"}), 500)
    [line] = events(logs, "error.unhandled")
    # max_traceback_frames reached the middleware: only the innermost frames are kept.
    assert line["traceback"].count('  File "') <= 2
    assert "in handler" in line["traceback"]


def test_settings_defaults_and_validation() -> None:
    s = error_sanitizer.Settings()
    assert (s.enabled, s.log_client_errors, s.max_traceback_frames) == (True, False, 30)
    with pytest.raises(ValueError, match="max_traceback_frames"):
        error_sanitizer.sanitizer(max_traceback_frames=0)


async def test_log_client_errors_logs_4xx_typed_errors_at_info(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    config = make_config(tmp_path, BALLAST__PLUGINS__ERROR_SANITIZER__LOG_CLIENT_ERRORS="true")
    client = await start(aiohttp_client, config)
    with with_context() as logs:
        body = await problem(await client.get("/v1/sessions/nobody"), 404)
    [line] = events(logs, "error.client")
    assert (line["request_id"], line["status"], line["log_level"]) == (body["request_id"], 404, "info")
    assert events(logs, "error.unhandled") == []
