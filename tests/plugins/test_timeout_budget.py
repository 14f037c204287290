"""timeout_budget: requests and finalize jobs end when their budget does, hung upstream or not.

The app is built from a real config with the openai provider pointed at the fake
upstream on loopback; the per-attempt upstream timeout is set far beyond the budgets,
so only the budget can end a hung call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from fake_upstream import FakeUpstream, Step
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from ballast import budget
from ballast.app import build_app
from ballast.budget import Deadline, deadline_scope
from ballast.config import Config, load_settings
from ballast.errors import BudgetExceeded, UpstreamError
from ballast.hookspecs import hookimpl
from ballast.jobs import JobContext
from ballast.middleware import MiddlewareSpec
from ballast.plugin_manager import load_plugins
from ballast.plugins import timeout_budget
from ballast.plugins.timeout_budget import Settings, request_budget
from ballast.problems import PROBLEM_CONTENT_TYPE
from ballast.telemetry import Telemetry
from ballast.upstream import UpstreamCall, UpstreamRequest, UpstreamResponse

LONG_ATTEMPT_MS = "60000"


class BudgetProbe:
    """A third-party plugin that records the budget left when each upstream call starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float | None]] = []

    @hookimpl
    def ballast_upstream_wrappers(self, config: Config) -> list[Any]:
        def wrap(call: UpstreamCall) -> UpstreamCall:
            async def probed(request: UpstreamRequest) -> UpstreamResponse:
                self.seen.append((request.name, budget.remaining()))
                return await call(request)

            return probed

        return [wrap]


def make_config(tmp_path: Path, fake: FakeUpstream, **env: str) -> Config:
    path = tmp_path / "ballast.toml"
    path.write_text("")
    environ = {"BALLAST__STORAGE__PATH": str(tmp_path / "ballast.db"),
               "BALLAST__STORAGE__DURABILITY": "normal",
               "BALLAST__INFERENCE__PROVIDER": "openai",
               "BALLAST__INFERENCE__BASE_URL": fake.base_url,
               "BALLAST__INFERENCE__MODEL": "fake-model",
               "BALLAST__INFERENCE__TIMEOUT_MS": LONG_ATTEMPT_MS,
               "BALLAST__PLUGINS__RETRY__START_TIMEOUT_S": "0.01",
               "BALLAST__PLUGINS__RETRY__JITTER": "false",
               **env}
    return load_settings(path, environ=environ)


async def start(aiohttp_client: AiohttpClient, config: Config, *extra: Any) -> TestClient[Any, Any]:
    plugins = load_plugins(config, eps=[], extra=[(f"probe{i}", p) for i, p in enumerate(extra)])
    return await aiohttp_client(build_app(config, plugins))


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def new_session(client: TestClient[Any, Any], sid: str) -> None:
    resp = await client.post("/v1/sessions", json={
        "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]})
    assert resp.status == 201, await resp.text()
    resp = await client.post(f"/v1/sessions/{sid}/mutations", json={"mutations": [
        {"id": "u1", "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900,
         "text": "Hi, I am Alice."},
        {"id": "u2", "type": "utterance", "speaker": "spk_1", "start_ms": 1000, "end_ms": 1900,
         "text": "This is Bob, I will send the notes."}]})
    assert resp.status == 200, await resp.text()


async def finished_job(client: TestClient[Any, Any], sid: str, within: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        resp = await client.get(f"/v1/sessions/{sid}/finalize")
        assert resp.status == 200
        job: dict[str, Any] = (await resp.json())["job"]
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, f"job still running after {within}s: {job}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


# --------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------


async def test_a_hung_report_stage_times_out_within_budget_and_finalize_can_run_again(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__FINALIZE_MS="1500")
    client = await start(aiohttp_client, config)
    await new_session(client, "s1")
    fake.script(Step.ok())  # reconcile names the speakers; then the report hangs
    fake.default = Step.hang(3600)
    with capture_logs() as logs:
        resp = await client.post("/v1/sessions/s1/finalize")
        assert resp.status == 202
        job = await finished_job(client, "s1")

    assert job["state"] == "timed_out"
    assert (job["attempt"], job["budget_ms"]) == (1, 1500)
    assert 1400 <= job["elapsed_ms"] <= job["budget_ms"] + 1000
    states = {s["name"]: s["state"] for s in job["stages"]}
    assert states["report"] == "timed_out"
    assert states["persist"] == "skipped"
    assert {states[s] for s in ("freeze", "drain", "replay", "reconcile", "stats", "events")} == {"succeeded"}
    assert job["error"]["title"] == "Finalize timed out"
    assert fake.attempts == 2  # resolve, then one report attempt: no retry past the budget

    [line] = events(logs, "finalize.timed_out")
    assert (line["session_id"], line["stage"], line["attempt"]) == ("s1", "report", 1)
    assert line["budget_ms"] == 1500
    assert line["elapsed_ms"] <= 1500 + 1000
    assert events(logs, "finalize.failed") == []

    # Nothing was lost: the log is intact, the report absent, the session not finalized.
    resp = await client.get("/v1/sessions/s1/mutations")
    assert [m["id"] for m in (await resp.json())["mutations"]] == ["u1", "u2"]
    session = await (await client.get("/v1/sessions/s1")).json()
    assert (session["state"], session["mutation_count"]) == ("failed", 2)
    assert (await client.get("/v1/sessions/s1/report")).status == 404

    fake.default = Step.ok()
    resp = await client.post("/v1/sessions/s1/finalize")
    assert resp.status == 202
    assert (await resp.json())["job"]["attempt"] == 2
    job = await finished_job(client, "s1")
    assert (job["state"], job["attempt"], job["error"]) == ("succeeded", 2, None)
    report = await client.get("/v1/sessions/s1/report")
    assert report.status == 200
    assert "summary" in await report.json()


async def test_a_finalize_job_has_its_own_budget_not_the_starting_requests(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__REQUEST_MS="5000",
                         BALLAST__PLUGINS__TIMEOUT_BUDGET__FINALIZE_MS="60000")
    probe = BudgetProbe()
    client = await start(aiohttp_client, config, probe)
    await new_session(client, "s1")
    assert (await client.post("/v1/sessions/s1/finalize")).status == 202
    job = await finished_job(client, "s1")
    assert (job["state"], job["budget_ms"]) == ("succeeded", 60_000)
    # reconcile names the speakers, then the report: both within the job's budget.
    assert [name for name, _ in probe.seen] == ["inference.resolve", "inference.report"]
    for _, left in probe.seen:
        assert left is not None and 50 < left <= 60


# --------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------


async def test_a_request_over_request_ms_is_a_504_problem(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__REQUEST_MS="1000")
    client = await start(aiohttp_client, config)
    await new_session(client, "s1")
    fake.default = Step.hang(3600)
    started = time.monotonic()
    resp = await client.post("/v1/sessions/s1/resolve")
    elapsed = time.monotonic() - started
    assert resp.status == 504, await resp.text()
    assert resp.headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    body = await resp.json()
    # Resolve writes (the names it finds): the 504 says the write may have been stored.
    assert (body["title"], body["detail"]) == (BudgetExceeded.title, timeout_budget.WRITE_TIMEOUT_DETAIL)
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert 0.9 <= elapsed < 15
    assert fake.attempts == 1

    fake.default = Step.ok()  # the next request has a budget of its own
    resp = await client.post("/v1/sessions/s1/resolve")
    assert resp.status == 200


async def test_the_remaining_request_budget_bounds_upstream_calls(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__REQUEST_MS="1500")
    probe = BudgetProbe()
    client = await start(aiohttp_client, config, probe)
    await new_session(client, "s1")
    fake.default = Step.hang(3600)
    started = time.monotonic()
    resp = await client.post("/v1/sessions/s1/resolve")
    elapsed = time.monotonic() - started
    # The attempt's own timeout is 60 s; only the 1.5 s budget can have ended it.
    assert resp.status == 504
    assert 1.4 <= elapsed < 15
    [(name, left)] = probe.seen
    assert name == "inference.resolve"
    assert left is not None and 0 < left <= 1.5

    fake.default = Step.hang(0.3)  # slow, but within the budget
    resp = await client.post("/v1/sessions/s1/resolve")
    assert resp.status == 200, await resp.text()


async def test_disabled_no_deadline_is_in_force(
        tmp_path: Path, aiohttp_client: AiohttpClient, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__ENABLED="false",
                         BALLAST__PLUGINS__TIMEOUT_BUDGET__REQUEST_MS="100")
    probe = BudgetProbe()
    client = await start(aiohttp_client, config, probe)
    await new_session(client, "s1")
    fake.default = Step.hang(0.5)  # longer than the (disabled) request_ms
    resp = await client.post("/v1/sessions/s1/resolve")
    assert resp.status == 200, await resp.text()
    assert (await client.post("/v1/sessions/s1/finalize")).status == 202
    job = await finished_job(client, "s1")
    assert (job["state"], job["budget_ms"]) == ("succeeded", None)
    assert [left for _, left in probe.seen] == [None, None]


# --------------------------------------------------------------------------------------
# the pieces, and the hooks
# --------------------------------------------------------------------------------------


async def test_request_budget_turns_a_budget_spent_upstream_failure_into_budget_exceeded() -> None:
    mw = request_budget(request_ms=50)

    async def spends_the_budget(request: Any) -> Any:
        # An upstream attempt cut to the budget fails at its end, before asyncio.timeout
        # gets to cancel anything: here, without yielding to the loop at all.
        time.sleep(0.08)  # noqa: ASYNC251 - blocking on purpose, see above
        raise UpstreamError(kind="timeout", internal="attempt cut to the budget")

    async def fails_early(request: Any) -> Any:
        raise UpstreamError(kind="status", upstream_status=500, internal="answered 500")

    fake_request: Any = SimpleNamespace(method="POST", path="/x")
    with pytest.raises(BudgetExceeded) as caught:
        await mw(fake_request, spends_the_budget)
    assert isinstance(caught.value.__cause__, UpstreamError)
    with pytest.raises(UpstreamError):
        await mw(fake_request, fails_early)
    with pytest.raises(ValueError, match="request_ms"):
        request_budget(request_ms=0)


async def test_an_outer_earlier_deadline_still_wins() -> None:
    mw = request_budget(request_ms=60_000)
    seen: list[float | None] = []

    async def handler(request: Any) -> Any:
        seen.append(budget.remaining())
        return None

    with deadline_scope(Deadline.after(0.5)):
        await mw(SimpleNamespace(method="GET", path="/"), handler)  # type: ignore[arg-type]
    assert seen[0] is not None and seen[0] <= 0.5


async def test_hook_ballast_finalize_wrappers(tmp_path: Path, fake: FakeUpstream) -> None:
    config = make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__FINALIZE_MS="200")
    plugins = load_plugins(config, eps=[])
    groups = plugins.hook.ballast_finalize_wrappers(config=config, telemetry=Telemetry())
    [wrap] = [w for group in groups for w in group]

    async def hangs(job: JobContext) -> None:
        job.current = "report"
        await asyncio.sleep(30)

    job = JobContext("s1", attempt=1)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded) as caught:
        await wrap(hangs)(job)
    assert time.monotonic() - started >= 0.19
    assert job.deadline is not None and job.deadline.budget_s == pytest.approx(0.2)
    assert "report" in caught.value.internal

    async def fails_at_once(job: JobContext) -> None:
        raise UpstreamError(kind="status", internal="answered 500")

    with pytest.raises(UpstreamError):  # not the budget: reported as what it is
        await wrap(fails_at_once)(JobContext("s2", attempt=1))

    blocked = load_plugins(make_config(tmp_path, fake, BALLAST__PLUGINS__TIMEOUT_BUDGET__ENABLED="false"),
                           eps=[])
    groups = blocked.hook.ballast_finalize_wrappers(config=config, telemetry=Telemetry())
    assert [w for group in groups for w in group] == []


def test_its_middleware_sits_inside_the_sanitizer(tmp_path: Path) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.timeout_budget]\nrequest_ms = 1234\n")
    config = load_settings(path, environ={})
    plugins = load_plugins(config, eps=[])
    [spec] = timeout_budget.ballast_middlewares(config=config)
    assert isinstance(spec, MiddlewareSpec)
    assert (spec.name, spec.order) == ("timeout_budget", 200)
    groups = plugins.hook.ballast_middlewares(config=config, telemetry=Telemetry())
    orders = {s.name: s.order for g in groups for s in g}
    assert orders["error_sanitizer"] < orders["timeout_budget"]
    assert config.plugin("timeout_budget").request_ms == 1234


def test_settings_defaults_and_bounds() -> None:
    s = Settings()
    assert (s.enabled, s.request_ms, s.finalize_ms) == (True, 30_000, 120_000)
    for bad in ({"request_ms": 0}, {"finalize_ms": 0}, {"deadline_ms": 5}):
        with pytest.raises(ValueError):
            Settings.model_validate(bad)
    assert json.loads(Settings().model_dump_json())["finalize_ms"] == 120_000


async def test_watchdog_cancels_only_requests_past_their_deadline() -> None:
    import asyncio

    from ballast.budget import Deadline
    from ballast.plugins.timeout_budget import Watchdog

    dog = Watchdog(interval_s=0.01)

    async def request(budget_s: float, work_s: float) -> str:
        task = asyncio.current_task()
        assert task is not None
        dog.watch(task, Deadline.after(budget_s))
        try:
            await asyncio.sleep(work_s)
            return "done"
        except asyncio.CancelledError:
            assert dog.release(task)
            assert task.cancelling() == 0  # uncancelled: the connection's task goes on
            return "cut"
        finally:
            dog.release(task)

    results = await asyncio.gather(request(0.05, 5.0), request(5.0, 0.02), request(0.05, 0.0))
    assert results == ["cut", "done", "done"]
    await asyncio.sleep(0.05)
    assert dog._handle is None, "the sweep timer stops when nothing is in flight"


async def test_the_request_deadline_is_in_force_without_a_scope_and_only_for_its_request() -> None:
    # The middleware registers the request's task with its watchdog rather than entering a
    # context-variable scope; budget.remaining() finds it there, and only there.
    mw = request_budget(request_ms=2_000)
    seen: dict[str, float | None] = {}

    async def handler(request: Any) -> Any:
        seen["inside"] = budget.remaining()
        with budget.unbounded():
            seen["lifted"] = budget.remaining()
        with deadline_scope(Deadline.after(0.25)):
            seen["earlier scope"] = budget.remaining()
        with deadline_scope(Deadline.after(60)):
            seen["later scope"] = budget.remaining()
        return None

    assert budget.remaining() is None
    await mw(SimpleNamespace(method="GET", path="/"), handler)  # type: ignore[arg-type]
    inside, earlier, later = seen["inside"], seen["earlier scope"], seen["later scope"]
    assert inside is not None and 1.5 < inside <= 2.0
    assert seen["lifted"] is None
    assert earlier is not None and earlier <= 0.25
    assert later is not None and 1.5 < later <= 2.0, "the request's earlier deadline still wins"
    assert budget.remaining() is None, "released with the request"
